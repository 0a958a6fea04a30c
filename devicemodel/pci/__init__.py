"""PCI: config space, capabilities, the bus, BARs, MSI/MSI-X/INTx, simple devices."""
