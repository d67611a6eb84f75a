"""sdexport runtime: loads a frozen artifact and generates images with no model code.

    import runtime
    pipe = runtime.load("my-artifact")            # verifies every file's sha256 first
    images = pipe.text2img("a (red):1.3 fox", steps=25, seed=1)
    edges = runtime.load_control("canny-artifact")    # a ControlNet artifact of the same family
    images = pipe.text2img("a house", control=edges, control_image=edge_image, control_scale=0.8)
"""

from runtime.artifact import load
from runtime.control_artifact import load_control
from runtime.manifest import ArtifactError
from runtime.pipeline import Pipeline

__all__ = ["ArtifactError", "Pipeline", "load", "load_control"]
