"""Old import path, kept for this round's merge: the run's launch moved to `atropos_core.services`."""
from .services import (BUILTIN_ENV, DEFAULT_MODEL_DIR, _place_servers, check_launchable,  # noqa: F401
                       launch_services, resolve_lengths, resolve_model_dir, share_launch_info)
