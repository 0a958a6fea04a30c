"""The VM description and its two front ends.

- ``model``: the description itself (VmConfig, LpcConfig, OvmfConfig; SlotConfig comes from
  devicemodel.slot), plain data;
- ``acrn_args``: acrn-dm's getopt-compatible command line → VmConfig (``VmConfig.to_args``
  writes it back);
- ``toml``: the TOML VM file ↔ VmConfig (docs/vm-toml.md);
- ``values``: the option values both front ends parse alike; ``validate``: the checks of a
  whole description; ``logger_setting``: ``--logger_setting``.

This package imports nothing above errors, slot, memory and hostinfo: no device, platform or
logging module. The checks that need the devices (emulation names, device options) are in
devicemodel/vmcheck.py.
"""

from __future__ import annotations

from ..errors import ConfigError
from ..slot import SlotConfig
from .acrn_args import (
    ACRN_EMULS,
    OBSOLETE_EMULS,
    OBSOLETE_OPTIONS,
    UNSUPPORTED_OPTIONS,
    HelpRequested,
    VersionRequested,
    parse_args,
)
from .logger_setting import LOGGERS, parse_logger_setting
from .model import (
    DEFAULT_MEMSIZE,
    DEFAULT_MONITOR_IDLE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    HYPERVISORS,
    LPC_DEVICES,
    VM_NAME_MAX,
    LpcConfig,
    OvmfConfig,
    VmConfig,
    format_memsize,
)
from .validate import validate
from .values import (
    parse_cpu_affinity,
    parse_hv,
    parse_lpc,
    parse_mem,
    parse_monitor_idle_timeout,
    parse_ovmf,
    parse_shutdown_timeout,
    parse_slot,
    parse_slot_address,
    parse_virtio_poll,
)

__all__ = [
    "ACRN_EMULS", "DEFAULT_MEMSIZE", "DEFAULT_MONITOR_IDLE_TIMEOUT", "DEFAULT_SHUTDOWN_TIMEOUT",
    "HYPERVISORS", "LOGGERS", "LPC_DEVICES", "OBSOLETE_EMULS", "OBSOLETE_OPTIONS",
    "UNSUPPORTED_OPTIONS", "VM_NAME_MAX", "ConfigError", "HelpRequested", "LpcConfig",
    "OvmfConfig", "SlotConfig", "VersionRequested", "VmConfig", "format_memsize", "parse_args",
    "parse_cpu_affinity", "parse_hv", "parse_lpc", "parse_logger_setting", "parse_mem",
    "parse_monitor_idle_timeout", "parse_ovmf", "parse_shutdown_timeout", "parse_slot",
    "parse_slot_address", "parse_virtio_poll", "validate",
]
