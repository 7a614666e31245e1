from setuptools import setup

# Lets Dataflow ship the package with `--setup_file ./setup.py`; metadata lives in pyproject.toml.
setup()
