"""Assembly, the layer above the devices: the VM (``vm.py``), its fixed platform
(``platform.py``), guest power transitions (``reset.py``) and host-side stopping
(``lifecycle.py``). Nothing below imports it."""
