"""How to reach an OPC UA server: the connection part of an agent's device entry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["OpcUaConnection"]


class OpcUaConnection(BaseModel):
    """The ``opcua:`` key of a device entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str = Field(pattern=r"^opc\.tcp://", description="e.g. opc.tcp://10.0.0.5:4840")
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["Sign", "SignAndEncrypt"] = "SignAndEncrypt"
    certificate: Path | None = Field(default=None, description="Client certificate (DER/PEM).")
    private_key: Path | None = Field(default=None, description="Client private key (PEM).")
    server_certificate: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    mode: Literal["read", "subscribe"] = Field(
        default="read", description="Batched reads each poll, or a subscription."
    )
    sampling_interval: float = Field(default=1.0, gt=0, description="Seconds (subscribe mode).")
    timeout: float = Field(default=4.0, gt=0, le=120, description="Seconds per service call.")
    connect_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Seconds to open the session (channel, session, address resolution), "
        "independent of the poll interval.",
    )
    root: str | list[str] | None = Field(
        default=None,
        description="Where this instance's points live, for a profile's relative addresses: "
        "a NodeId ('ns=2;s=Dev0001') or a browse path from Objects (['2:Plant', '2:Dev0001']).",
    )

    @model_validator(mode="after")
    def _security(self) -> Self:
        if self.security_policy != "None" and (
            self.certificate is None or self.private_key is None
        ):
            raise ValueError("security_policy Basic256Sha256 needs certificate and private_key")
        if isinstance(self.root, list) and (not self.root or not all(self.root)):
            raise ValueError("root as a browse path needs at least one non-empty element")
        if isinstance(self.root, str) and not self.root.strip():
            raise ValueError("root must not be empty")
        if (self.username is None) != (self.password is None):
            raise ValueError("give both username and password, or neither")
        return self
