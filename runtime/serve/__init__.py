"""HTTP serving of artifacts: A1111's /sdapi/v1 API, batching, a web page (needs `pip install -e ".[serve]"`).

    python -m runtime.serve ARTIFACT [ARTIFACT ... | FOLDER] [--port 7861] [--device cuda] [--api-auth u:p]

`ServeSettings` (settings.py) and `create_app(settings)` (app.py) are the pieces a deployment uses.
"""

from runtime.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
