"""Modbus: TCP, RTU over a serial line, RTU over TCP; codec and read planning."""
