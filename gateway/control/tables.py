"""The control plane's tables: desired and reported configurations, writes, discovery.

They live in the registry's database (same metadata, same versioned migrations), so
every gateway instance sharing that database sees the same state: a reply stored by
the instance that received it is read by the instance whose API call is waiting.
JSON documents are stored as text so SQLite and PostgreSQL agree.
"""

from __future__ import annotations

import sqlalchemy as sa

from gateway.registry.tables import metadata

__all__ = [
    "CONTROL_TABLES",
    "agent_configs",
    "config_reports",
    "discovered",
    "scans",
    "uploaded_profiles",
    "write_audit",
]

agent_configs = sa.Table(
    "agent_configs",
    metadata,
    sa.Column("agent", sa.String(64), primary_key=True),
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("document", sa.Text, nullable=False),  # the DesiredConfig as published
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
    sa.Column("updated_by", sa.String(80), nullable=False),
    sa.Column("published", sa.Boolean, nullable=False, default=False),
)

config_reports = sa.Table(
    "config_reports",
    metadata,
    sa.Column("agent", sa.String(64), primary_key=True),
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("applied", sa.Boolean, nullable=False),
    sa.Column("running_version", sa.BigInteger, nullable=False),
    sa.Column("ts_ms", sa.BigInteger, nullable=False),
    sa.Column("errors", sa.Text, nullable=False),
    sa.Column("received_ms", sa.BigInteger, nullable=False),
)

uploaded_profiles = sa.Table(
    "uploaded_profiles",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("document", sa.Text, nullable=False),
    sa.Column("uploaded_ms", sa.BigInteger, nullable=False),
)

write_audit = sa.Table(
    "write_audit",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # the command's request id
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("device", sa.String(64), nullable=False),
    sa.Column("agent", sa.String(64), nullable=True),
    sa.Column("point", sa.String(64), nullable=False),
    sa.Column("value", sa.Text, nullable=False),  # JSON
    sa.Column("previous", sa.Text, nullable=True),  # JSON, as the agent read it
    sa.Column("read_back", sa.Text, nullable=True),  # JSON
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.String(500), nullable=False, default=""),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("token_label", sa.String(40), nullable=False),
    sa.Column("requested_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
    sa.Column("finished_ms", sa.BigInteger, nullable=True),
)

scans = sa.Table(
    "scans",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    sa.Column("requested_ms", sa.BigInteger, nullable=False),
    sa.Column("expires_ms", sa.BigInteger, nullable=False),
    sa.Column("reports", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Text, nullable=False, default="[]"),
    # When its final (``done``) report arrived: later reports for it are refused.
    sa.Column("finished_ms", sa.BigInteger, nullable=True),
)

discovered = sa.Table(
    "discovered",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("enterprise", sa.String(64), nullable=False),
    sa.Column("agent", sa.String(64), nullable=False),
    # SHA-256 of the canonical address: with the agent, the proposal's stable unique id.
    sa.Column("address_key", sa.String(64), nullable=False),
    sa.Column("protocol", sa.String(64), nullable=False),
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("answered", sa.Text, nullable=False),
    sa.Column("candidates", sa.Text, nullable=False),
    sa.Column("scan", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # new, approved, rejected
    sa.Column("device_id", sa.String(64), nullable=True),
    sa.Column("first_seen_ms", sa.BigInteger, nullable=False),
    sa.Column("last_seen_ms", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("agent", "address_key", name="uq_discovered_agent_address"),
)

sa.Index("ix_write_audit_device", write_audit.c.enterprise, write_audit.c.device)
sa.Index("ix_discovered_status", discovered.c.enterprise, discovered.c.status)

CONTROL_TABLES = (agent_configs, config_reports, uploaded_profiles, write_audit, scans, discovered)
