"""Wire protocols: Modbus, OPC UA, and the MQTT uplink contract. No business logic."""
