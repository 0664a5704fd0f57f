"""Simulators: Modbus and OPC UA servers that behave like real equipment."""
