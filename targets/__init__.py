"""Target descriptions (``registry``) and the backends that lower to them (``tvm``)."""
