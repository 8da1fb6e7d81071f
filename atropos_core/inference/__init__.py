"""The inference side: our vLLM server (Atropos `/generate` + token-protected weight updates), its
command line (`vllm_command`), and the worker extension that receives weights in place.

Only `worker_ext` and `server` import vLLM, and only inside vLLM's own processes; `vllm_command`
builds the server's argv and is safe to import anywhere. `atropos_core.services` starts it.
"""
