"""One ``APIRouter`` per resource; ``gateway.api.app.ROUTERS`` lists them in order."""
