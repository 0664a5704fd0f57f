"""How to reach an OPC UA server: the connection part of an agent's device entry."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

__all__ = ["OpcUaConnection"]

_FASTEST_CHANGES = 0.1  # s: the sampling assumed of a server reporting changes as they happen


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
    sampling_interval: float = Field(
        default=1.0,
        ge=0,
        le=86400,
        description="Seconds between the server's samples of each point (subscribe mode); "
        "0: the server reports each change as it happens, where it can.",
    )
    publishing_interval: float | None = Field(
        default=None,
        gt=0,
        le=86400,
        description="Seconds between the server's notification messages (subscribe mode); "
        "default: the sampling interval (1 s when that is 0).",
    )
    queue_size: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description="Values the server keeps per point between two notification messages; "
        "default: every sample of one publishing interval, and one more.",
    )
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

    @property
    def publishing(self) -> float:
        """Seconds between notification messages, as asked of the server."""
        if self.publishing_interval is not None:
            return self.publishing_interval
        return self.sampling_interval or 1.0

    @property
    def queue(self) -> int:
        """Values the server is asked to keep per point (``queue_size`` or enough for one interval).

        Enough for every sample taken in one publishing interval, and one more for a late
        publish; a server reporting changes as they happen (sampling 0) is taken to sample
        at 10 Hz at most, the rate most servers coalesce changes to.
        """
        if self.queue_size is not None:
            return self.queue_size
        sampling = self.sampling_interval or _FASTEST_CHANGES
        return min(1000, math.ceil(self.publishing / sampling - 1e-9) + 1)

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
