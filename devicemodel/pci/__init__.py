"""PCI: config space, capabilities, the bus (BARs, INTx routing, the fast paths functions
declare), the MSI/MSI-X capabilities over the interrupt layer (``devicemodel.irq``),
simple devices."""
