"""Unit tests: one module or class in isolation (a device on the mock transport, a parser,
an ABI layout against the system header), no VM."""
