"""The prelude of every child script that must run without model code: importing `sdexport`,
`transformers` or `diffusers` raises, so the child proves that `runtime` alone runs an artifact."""

BLOCK_MODEL_CODE = r"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sdexport", "transformers", "diffusers"):
            raise ImportError(f"{name} is blocked in the runtime test")
        return None
sys.meta_path.insert(0, Block())
"""
