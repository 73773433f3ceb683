"""Protocol buffers of the vaegan service; generated modules are rebuilt by ``protos/generate.py``."""
