"""Where things sit in a virtio-pci function: acrn-dm's BAR plan (acrn-facts §3.6) and the
register offsets of the legacy block and the modern common configuration (virtio 1.2
§4.1.4)."""

from __future__ import annotations

NO_VECTOR = 0xFFFF
ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF, 8: 0xFFFF_FFFF_FFFF_FFFF}

# BAR indices (acrn-dm's fixed plan)
LEGACY_BAR = 0
MSIX_BAR = 1
PIO_NOTIFY_BAR = 2
MODERN_BAR = 4

# modern MMIO BAR layout
MODERN_BAR_SIZE = 0x4000
REGION_SIZE = 0x1000
COMMON_OFF = 0x0000
ISR_OFF = 0x1000
DEVICE_OFF = 0x2000
NOTIFY_OFF = 0x3000
NOTIFY_MULTIPLIER = 4
PIO_NOTIFY_SIZE = 4

# legacy register block (virtio 0.9.5 / §4.1.4.8)
L_HOST_FEATURES = 0
L_GUEST_FEATURES = 4
L_QUEUE_PFN = 8
L_QUEUE_NUM = 12
L_QUEUE_SEL = 14
L_QUEUE_NOTIFY = 16
L_STATUS = 18
L_ISR = 19
L_MSIX_CONFIG = 20
L_MSIX_QUEUE = 22
LEGACY_CONFIG_NOMSIX = 20
LEGACY_CONFIG_MSIX = 24
LEGACY_PFN_SHIFT = 12
LEGACY_VRING_ALIGN = 4096
LEGACY_SIZES = {L_HOST_FEATURES: 4, L_GUEST_FEATURES: 4, L_QUEUE_PFN: 4, L_QUEUE_NUM: 2,
                L_QUEUE_SEL: 2, L_QUEUE_NOTIFY: 2, L_STATUS: 1, L_ISR: 1,
                L_MSIX_CONFIG: 2, L_MSIX_QUEUE: 2}

# common configuration structure (§4.1.4.3)
C_DFSELECT = 0
C_DF = 4
C_GFSELECT = 8
C_GF = 12
C_MSIX = 16
C_NUMQ = 18
C_STATUS = 20
C_CFGGEN = 21
C_Q_SELECT = 22
C_Q_SIZE = 24
C_Q_MSIX = 26
C_Q_ENABLE = 28
C_Q_NOFF = 30
C_Q_DESCLO = 32
C_Q_DESCHI = 36
C_Q_AVAILLO = 40
C_Q_AVAILHI = 44
C_Q_USEDLO = 48
C_Q_USEDHI = 52
COMMON_CFG_SIZE = 56
COMMON_SIZES = {C_DFSELECT: 4, C_DF: 4, C_GFSELECT: 4, C_GF: 4, C_MSIX: 2, C_NUMQ: 2,
                C_STATUS: 1, C_CFGGEN: 1, C_Q_SELECT: 2, C_Q_SIZE: 2, C_Q_MSIX: 2,
                C_Q_ENABLE: 2, C_Q_NOFF: 2, C_Q_DESCLO: 4, C_Q_DESCHI: 4, C_Q_AVAILLO: 4,
                C_Q_AVAILHI: 4, C_Q_USEDLO: 4, C_Q_USEDHI: 4}
RING_FIELDS = {C_Q_DESCLO: ("desc_addr", 0), C_Q_DESCHI: ("desc_addr", 32),
               C_Q_AVAILLO: ("avail_addr", 0), C_Q_AVAILHI: ("avail_addr", 32),
               C_Q_USEDLO: ("used_addr", 0), C_Q_USEDHI: ("used_addr", 32)}

ISR_QUEUE = 0x1
ISR_CONFIG = 0x2
