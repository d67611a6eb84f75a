"""sdexport runtime: loads a frozen artifact and generates images with no model code.

    import runtime
    pipe = runtime.load("my-artifact")            # verifies every file's sha256 first
    images = pipe.text2img("a (red):1.3 fox", steps=25, seed=1)
"""

from runtime.artifact import load
from runtime.manifest import ArtifactError
from runtime.pipeline import Pipeline

__all__ = ["ArtifactError", "Pipeline", "load"]
