"""Old import path, kept for this round's merge: the vLLM command line is `inference.vllm_command`;
starting the server (`start_vllm_server`, `VLLMServerHandle`) is `atropos_core.services`."""
from atropos_core.inference.vllm_command import (CPU_WEIGHT_LAYOUT_ENV, CPU_WEIGHT_LAYOUTS,  # noqa: F401
                                                 RUN_OWNED_FLAGS, check_user_vllm_args, merge_vllm_flags,
                                                 new_update_token, served_name_from, vllm_server_command)
