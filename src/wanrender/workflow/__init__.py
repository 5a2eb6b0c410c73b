"""ComfyUI workflow files: read into render requests (``reader.read``) and written
from them (``export.to_api``, ``export.to_ui``). See docs/architecture.md, "The
workflow layer"."""
