"""Fuzz targets (hypothesis): a short mode runs in every pytest run, a long mode on demand.

Long mode: ``ACRN_PYDM_FUZZ_LONG=1 pytest tests/fuzz`` (1,000,000 examples per test) or
``python -m tests.fuzz <target> --examples N``. See ``_common.py``.
"""
