"""Names vulture reports as unused that are reached by name or by a framework (`vulture`).

Not part of any package: setuptools only ships the packages named in pyproject.toml.
"""

# ruff: noqa
from types import SimpleNamespace

_ = SimpleNamespace()

# FastAPI routes, exception handlers and response-model fields
_invalid_request  # unused function (gateway/api/app.py)
get_config  # unused function (gateway/api/control.py)
outbox_pending_lines  # unused variable (gateway/api/models.py)
online_ratio  # unused variable (gateway/api/models.py)
latest_ts  # unused variable (gateway/api/models.py)
topic_prefix  # unused variable (gateway/api/models.py)
import_ledger  # unused function (gateway/api/routers/devices.py)
get_targets  # unused function (gateway/api/routers/on_cloud.py)
put_targets  # unused function (gateway/api/routers/on_cloud.py)
prometheus  # unused function (gateway/api/routers/ops.py)
create_key  # unused function (gateway/api/routers/provisioning.py)
history  # unused function (gateway/api/routers/ratios.py)
connection_report  # unused function (gateway/api/routers/reports.py)
get_profile  # unused function (gateway/api/control.py)
device_history  # unused function (gateway/api/routers/devices.py)
reconciliation  # unused function (gateway/api/routers/provincial.py)
verify  # unused function (gateway/api/routers/provincial.py)
report_devices  # unused function (gateway/api/routers/provincial.py)
definitions  # unused function (gateway/api/routers/provincial.py)
report_file  # unused function (gateway/api/routers/provincial.py)
quality_connected  # unused variable (gateway/api/models.py)
quality_ratio  # unused variable (gateway/api/models.py)
last_gap_ms  # unused variable (gateway/api/models.py)
enterprise_name  # unused variable (simulators/plant.py)

# Typer commands and callbacks
list_profiles  # unused function (device_profiles/cli.py)
validate  # unused function (device_profiles/cli.py)
push  # unused function (edge_agent/config_cli.py)
init_broker  # unused function (gateway/cli.py)
_root  # unused function (iiot/cli.py)
plant_cmd  # unused function (simulators/cli.py)

# Pydantic validators and serializers
_._addresses  # unused method (device_profiles/schema.py)
_._scale_not_zero  # unused method (device_profiles/schema.py)
_._range_ordered  # unused method (device_profiles/schema.py)
_._settings  # unused method (device_profiles/schema.py)
_._known_family  # unused method (device_profiles/schema.py)
_._known_protocol  # unused method (device_profiles/schema.py)
_._url  # unused method (edge_agent/config.py)
_._client_id_is_username  # unused method (edge_agent/config.py)
_._backoff_bounds  # unused method (edge_agent/config.py)
_._check_hosts  # unused method (edge_agent/discovery.py)
_._check_units  # unused method (edge_agent/discovery.py)
_._plain_url  # unused method (edge_agent/discovery.py)
_._bounded  # unused method (edge_agent/discovery.py)
_._backoff_bounds  # unused method (gateway/config.py)
_._client_id_default  # unused method (gateway/config.py)
_._client_id_is_username  # unused method (gateway/config.py)
_._telemetry_url  # unused method (gateway/config.py)
_._last_seq_fits  # unused method (protocols/mqtt/contract.py)
_._security  # unused method (protocols/opcua/config.py)
_._exactly_one  # unused method (protocols/opcua/profile.py)
_._dump  # unused method (protocols/parts.py)
_._yaml_on  # unused method (simulators/plant.py)
_._port  # unused method (simulators/plant.py)
_._unique  # unused method (simulators/plant.py)

# Overrides of library methods and library callbacks
_pragmas  # unused function (gateway/registry/rows.py)
_.authenticate  # unused method (iiot/broker.py)
_.topic_filtering  # unused method (iiot/broker.py)
_._initialize_client_session  # unused method (iiot/broker.py)
_._publish_retained_messages_for_subscription  # unused method (iiot/broker.py)
_._run_broadcast  # unused method (iiot/broker.py)
_.datachange_notification  # unused method (protocols/opcua/driver.py)
val  # unused variable (protocols/opcua/driver.py)
_.status_change_notification  # unused method (protocols/opcua/driver.py)
_.device_ids  # unused method (simulators/modbus_server.py)
_.async_getValues  # unused method (simulators/modbus_server.py)
_.async_setValues  # unused method (simulators/modbus_server.py)
_.callback_new_connection  # unused method (simulators/modbus_server.py)
_.load_standard_address_space  # unused method (simulators/opcua_server.py)
shelf_file  # unused variable (simulators/opcua_server.py)
_.get_user  # unused method (simulators/opcua_server.py)
_._make_protocol  # unused method (simulators/opcua_server.py)

# Attributes a library reads (uvicorn, asyncua, paho, pytest)
_.should_exit  # unused attribute (bench/ratios.py)
_.session_timeout  # unused attribute (edge_agent/discovery.py)
_.on_publish  # unused attribute (edge_agent/publisher.py)
_.SessionExpiryInterval  # unused attribute (gateway/ingest.py)
_.ReceiveMaximum  # unused attribute (gateway/ingest.py)
_.should_exit  # unused attribute (gateway/service.py)
_.product_uri  # unused attribute (protocols/opcua/driver.py)
_.session_timeout  # unused attribute (protocols/opcua/driver.py)
_.connection_lost_callback  # unused attribute (protocols/opcua/driver.py)
_.product_uri  # unused attribute (simulators/opcua_server.py)
_.writeable  # unused attribute (gateway/registry/index.py)

# SQL functions and their compilers, which SQLAlchemy reads and finds by decorator
inherit_cache  # unused variable (gateway/registry/tables.py)
_db_now_ms_default  # unused function (gateway/registry/tables.py)
_db_now_ms_pg  # unused function (gateway/registry/tables.py)
_db_xid_default  # unused function (gateway/registry/tables.py)
_db_xid_pg  # unused function (gateway/registry/tables.py)

# Counters kept for inspection (driver stats, simulator counters) and references held on purpose
splits  # unused variable (protocols/modbus/driver.py)
bits_read  # unused variable (protocols/modbus/driver.py)
bytes_read  # unused variable (protocols/modbus/driver.py)
_.bits_read  # unused attribute (protocols/modbus/driver.py)
_.bytes_read  # unused attribute (protocols/modbus/driver.py)
_.splits  # unused attribute (protocols/modbus/driver.py)
sessions_lost  # unused variable (protocols/opcua/driver.py)
_._subscription  # unused attribute (protocols/opcua/driver.py)
_.sessions_lost  # unused attribute (protocols/opcua/driver.py)
_.bad_frames  # unused attribute (simulators/modbus_server.py)
_.update_errors  # unused attribute (simulators/opcua_server.py)

# Test fixtures, hooks and plug-ins pytest or the protocol registry finds by name
pytest_runtest_makereport  # unused function (tests/conftest.py)
pytest_collection_finish  # unused function (tests/conftest.py)
describe  # unused method (edge_agent/metrics.py: prometheus_client asks a collector)
_.longrepr  # unused attribute (tests/conftest.py)
no_leftover_tasks  # unused function (tests/conftest.py)
_no_leftover_threads  # unused function (tests/edge_agent/conftest.py)
_.SessionExpiryInterval  # unused attribute (tests/gateway/test_broker_deploy.py)
_.should_exit  # unused attribute (tests/gateway/test_dashboard.py)
FakeProtoDriver  # unused class (tests/protocols/fakeproto/driver.py)
_fakeproto  # unused function (tests/protocols/fakeproto/test_fakeproto.py)
_leaves_nothing_behind  # unused function (tests/protocols/test_modbus_driver.py)
no_threads_left_behind  # unused function (tests/test_embedded_broker.py)

# asyncio.Protocol callbacks, called by the event loop
_.data_received  # unused method (simulators/modbus_tcp.py, bench/modbus_sim.py)
_.connection_lost  # unused method (simulators/modbus_tcp.py)

# pydantic validators, found by decorator
_batch_is_json  # unused method (edge_agent/config.py)

# Protocol-buffer message fields, set by attribute; the message type NDATA of the spec
_.int_value  # unused attribute (protocols/mqtt/sparkplug/payload.py)
_.float_value  # unused attribute (protocols/mqtt/sparkplug/payload.py)
_.double_value  # unused attribute (protocols/mqtt/sparkplug/payload.py)
NDATA  # unused variable (protocols/mqtt/sparkplug/payload.py)

# pytest reads module marks by name
pytestmark  # unused variable (tests/protocols/test_opcua_scale.py)

# asyncua's client calls this override by name
_wait_for_health_signal  # unused method (protocols/opcua/client.py)
