"""Build script: pure Python today; the optional CUDA extension adaptsr._C will be added here.

Metadata lives in pyproject.toml.
"""

from setuptools import setup

setup()
