"""The inference side: our vLLM server (Atropos `/generate` + token-protected weight updates), its
launcher, and the worker extension that receives weights in place.

Only `worker_ext` and `server` import vLLM, and only inside vLLM's own processes; `launch` starts
the server as a child process and is safe to import anywhere.
"""
from atropos_core.inference.launch import (
    VLLMServerHandle,
    new_update_token,
    start_vllm_server,
    vllm_server_command,
)

__all__ = ["VLLMServerHandle", "new_update_token", "start_vllm_server", "vllm_server_command"]
