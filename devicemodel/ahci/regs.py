"""AHCI 1.3.1 register layout and bits, the FIS types and the ATA status/error bits the
controller and its drives share (AHCI 1.3.1 §3, §4; SATA 3.x §10.5; ATA8-ACS §6)."""

from __future__ import annotations

# --- the HBA's global registers (ABAR offsets) --------------------------------------
CAP, GHC, IS, PI, VS = 0x00, 0x04, 0x08, 0x0C, 0x10
CCC_CTL, CCC_PORTS, EM_LOC, EM_CTL, CAP2, BOHC = 0x14, 0x18, 0x1C, 0x20, 0x24, 0x28
PORT_BASE = 0x100  # port n's registers at PORT_BASE + n * PORT_STRIDE
PORT_STRIDE = 0x80
MAX_PORTS = 32
#: ports acrn-dm always reports (an Intel ICH8 has six), however few are configured
MIN_PORTS = 6
SLOTS = 32
VERSION_1_3 = 0x0001_0300

CAP_NP_MASK = 0x1F
CAP_NCS_SHIFT = 8
CAP_PSC = 1 << 13  # partial state capable
CAP_SSC = 1 << 14  # slumber state capable
CAP_PMD = 1 << 15  # PIO multiple DRQ blocks
CAP_ISS_GEN3 = 3 << 20  # interface speed: 6 Gbps
CAP_SCLO = 1 << 24  # command list override
CAP_SAM = 1 << 18  # AHCI mode only (GHC.AE reads 1)
CAP_SSS = 1 << 27  # staggered spin-up
CAP_SNCQ = 1 << 30  # native command queuing
CAP_S64A = 1 << 31  # 64-bit addressing

GHC_HR = 1 << 0  # HBA reset
GHC_IE = 1 << 1  # interrupt enable
GHC_MRSM = 1 << 2  # MSI revert to single message (read-only)
GHC_AE = 1 << 31  # AHCI enable

# --- a port's registers (offsets inside its 0x80 bytes) ---------------------------------
P_CLB, P_CLBU, P_FB, P_FBU, P_IS, P_IE, P_CMD = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14, 0x18
P_TFD, P_SIG, P_SSTS, P_SCTL, P_SERR, P_SACT, P_CI = 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38
P_SNTF, P_FBS, P_DEVSLP = 0x3C, 0x40, 0x44

# PxIS / PxIE
IS_DHRS = 1 << 0  # a D2H register FIS with the I bit arrived
IS_PSS = 1 << 1  # a PIO setup FIS with the I bit
IS_DSS = 1 << 2  # a DMA setup FIS with the I bit
IS_SDBS = 1 << 3  # a set device bits FIS with the I bit
IS_UFS = 1 << 4
IS_DPS = 1 << 5  # a PRD with the I bit was processed
IS_PCS = 1 << 6
IS_DMPS = 1 << 7
IS_PRCS = 1 << 22
IS_IPMS = 1 << 23
IS_OFS = 1 << 24  # overflow: the device sent more than the PRDs hold
IS_INFS = 1 << 26
IS_IFS = 1 << 27  # interface fatal error (a malformed command)
IS_HBDS = 1 << 28
IS_HBFS = 1 << 29  # host bus fatal error (a pointer outside guest memory)
IS_TFES = 1 << 30  # the task file has ERR set
IS_CPDS = 1 << 31
IE_MASK = 0xFDC0_00FF
#: interrupts after which the HBA stops processing the command list until PxCMD.ST is
#: cleared (AHCI 1.3.1 §6.2.2)
FATAL = IS_TFES | IS_HBFS | IS_HBDS | IS_IFS

# PxCMD
CMD_ST = 1 << 0
CMD_SUD = 1 << 1
CMD_POD = 1 << 2
CMD_CLO = 1 << 3
CMD_FRE = 1 << 4
CMD_CCS_SHIFT = 8
CMD_CCS_MASK = 0x1F << CMD_CCS_SHIFT
CMD_FR = 1 << 14
CMD_CR = 1 << 15
CMD_CPS = 1 << 16
CMD_ATAPI = 1 << 24
CMD_DLAE = 1 << 25
CMD_ALPE = 1 << 26
CMD_ASP = 1 << 27
CMD_ICC_MASK = 0xF << 28
#: bits software may write (the rest are the HBA's)
CMD_WRITABLE = (CMD_ST | CMD_SUD | CMD_POD | CMD_CLO | CMD_FRE | CMD_ATAPI | CMD_DLAE
                | CMD_ALPE | CMD_ASP | CMD_ICC_MASK)

# PxSSTS / PxSCTL
SSTS_DET_PRESENT = 0x3  # device present, phy communication established
SSTS_SPD_GEN3 = 0x3 << 4
SSTS_IPM_ACTIVE = 0x1 << 8
SCTL_DET_MASK = 0xF
SCTL_DET_COMRESET = 0x1
SCTL_DET_OFFLINE = 0x4
SCTL_SPD_MASK = 0xF << 4

# signatures (PxSIG) a drive reports after a reset
SIG_ATA = 0x0000_0101
SIG_ATAPI = 0xEB14_0101
SIG_NONE = 0xFFFF_FFFF

# --- command list and table (AHCI §4.2) ---------------------------------------------------
HDR_SIZE = 32
HDR_CFL_MASK = 0x1F  # command FIS length in dwords
HDR_ATAPI = 1 << 5
HDR_WRITE = 1 << 6
HDR_RESET = 1 << 8
HDR_CLEAR_BUSY = 1 << 10
CT_CFIS, CT_ACMD, CT_PRDT = 0x00, 0x40, 0x80
PRD_SIZE = 16
PRD_DBC_MASK = 0x3F_FFFF

# --- the received FIS area (AHCI §4.2.1) --------------------------------------------------
RX_PIO_SETUP, RX_D2H, RX_SDB = 0x20, 0x40, 0x58
RX_SIZE = 256

FIS_H2D = 0x27
FIS_D2H = 0x34
FIS_PIO_SETUP = 0x5F
FIS_SDB = 0xA1
FIS_C = 0x80  # H2D: a command (set) or a device control update (clear)
FIS_I = 0x40  # D2H/SDB/PIO setup: raise the interrupt
FIS_D = 0x20  # PIO setup: data moves device to host
CTL_SRST = 0x04  # device control: software reset

# --- ATA task file ------------------------------------------------------------------------
ST_ERR = 0x01
ST_DRQ = 0x08
ST_DSC = 0x10
ST_DF = 0x20
ST_DRDY = 0x40
ST_BSY = 0x80
ST_OK = ST_DRDY | ST_DSC
ER_ABRT = 0x04
ER_IDNF = 0x10
ER_UNC = 0x40
