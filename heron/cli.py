"""The ``heron`` command: ``heron serve [MODEL]``, ``heron chat`` and ``heron bench ...``.

Flag names follow vLLM's, so a vLLM command line mostly works unchanged. Engine flags
(``add_engine_args`` / ``engine_config_from_args``) are shared by every subcommand that
builds an engine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from heron.config import (
    DEVICES,
    DP_BACKENDS,
    DTYPES,
    GGUF_MEMORY,
    GRAMMAR_INDEX,
    LOAD_FORMATS,
    QUANTIZATIONS,
    ROUTERS,
    CacheConfig,
    EngineConfig,
    LoRAConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    gguf_memory_for,
    parse_size,
)
from heron.lora import LoRARequest
from heron.pooling_params import POOLING_TYPES
from heron.sampling_params import MAX_LOGPROBS, MAX_N
from heron.server.config import TOOL_CALL_PARSERS, ServerConfig
from heron.server.reasoning import REASONING_PARSERS

_SERVE_EPILOG = """\
examples:
  heron serve                                        # the embedded default model (Gemma 3 270M)
  heron serve --served-model-name mosaicml/mpt-7b    # answer to the name your clients use
  heron serve ./my-model --port 8080 --api-key sk-local --max-model-len 4096
  heron serve ./my-model --data-parallel-size 2      # two engines, one per half of the CPUs
  heron serve ./my-model -dp 2 --data-parallel-backend ray   # on a running Ray cluster

endpoints: POST /v1/chat/completions, /v1/completions, /tokenize, /detokenize;
GET /v1/models, /v1/models/{id}, /health, /version, /metrics, /docs, /openapi.json;
GET / is a chat page (--disable-web-ui turns it off)
"""

_CHAT_EPILOG = """\
examples:
  heron chat                                   # the default model, loaded in this process
  heron chat ./my-model --max-model-len 4096   # a model directory or GGUF file
  heron chat --url http://127.0.0.1:8000       # a running server (its first model)

at the prompt: /system TEXT, /clear, /help, /exit (or Ctrl-D); Ctrl-C stops an answer;
a \"\"\" line starts and ends a multi-line message
"""


def main(argv: Sequence[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    # The benchmarks' modules (httpx, numpy: ~0.4 s) are imported only for `heron bench`.
    parser = build_parser(with_benchmarks="bench" in words)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad flag values (config validation)
        parser.exit(2, f"heron: error: {e}\n")
    except KeyboardInterrupt:
        return 130


def build_parser(with_benchmarks: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heron", description="heron: an OpenAI-compatible LLM inference server."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_serve_parser(sub)
    _add_chat_parser(sub)
    _add_bench_parser(sub, with_benchmarks)
    return parser


# ==== heron serve =================================================================================


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (chat, completions, "
        "models, tokenize, metrics).",
        epilog=_SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="a model directory (HF layout) or GGUF file; default: the embedded Gemma 3 270M",
    )
    http = p.add_argument_group("HTTP server")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    http.add_argument("--port", type=int, default=8000, help="port to bind (default: %(default)s)")
    http.add_argument(
        "--api-key",
        default=os.environ.get("HERON_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: $HERON_API_KEY, else no auth)",
    )
    http.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="model name(s) clients use; the first is reported in responses "
        "(default: the model's own name)",
    )
    http.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        metavar="ORIGIN",
        help="CORS origins to allow, e.g. '*' or http://localhost:3000 (a JSON "
        "list also works); default: CORS off",
    )
    http.add_argument(
        "--allowed-hosts",
        nargs="+",
        default=None,
        metavar="HOST",
        help="Host header names to serve besides loopback ones, or '*' for any; default: when "
        "bound to a loopback address only localhost, *.localhost, 127.x.x.x and [::1] (DNS "
        "rebinding guard), else any",
    )
    http.add_argument(
        "--max-request-bytes",
        type=parse_size,
        default=4 << 20,
        metavar="SIZE",
        help="largest request body, e.g. 4MiB (default: 4MiB); larger ones get a 413",
    )
    http.add_argument(
        "--max-n",
        type=int,
        default=16,
        help=f"largest n (choices per request) accepted (default: %(default)s, at most {MAX_N})",
    )
    http.add_argument(
        "--max-seqs-per-request",
        type=int,
        default=256,
        metavar="N",
        help="most engine sequences one request may ask for: prompts x n on /v1/completions "
        "(default: %(default)s)",
    )
    http.add_argument(
        "--max-logprobs",
        type=int,
        default=MAX_LOGPROBS,
        help="largest logprobs / top_logprobs accepted (default: %(default)s)",
    )
    http.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="read tool calls the model writes in its own format (tool_choice auto); default: "
        "auto constrains the output to text or a hermes-style <tool_call> block",
    )
    http.add_argument(
        "--reasoning-parser",
        default="auto",
        choices=REASONING_PARSERS,
        help="split a thinking model's <think>...</think> off the answer (reasoning_content, "
        "reasoning items, thinking blocks): qwen3 (the output or the prompt opens <think>), "
        "deepseek_r1 (the output starts inside it), none; auto (default): qwen3 when the chat "
        "template holds <think>",
    )
    http.add_argument(
        "--pooling",
        default="mean",
        choices=POOLING_TYPES,
        help="/v1/embeddings: pool the final hidden states by their mean or take the last "
        "token's (default: %(default)s); vectors are L2-normalised",
    )
    http.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vLLM compatibility: tool_choice auto is always available",
    )
    http.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    http.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="do not log one line per HTTP request",
    )
    http.add_argument(
        "--disable-web-ui",
        action="store_true",
        help="do not serve the chat page at / (the API is unchanged)",
    )
    add_engine_args(p)
    _add_lora_args(p)
    add_parallel_args(p)
    p.set_defaults(func=_run_serve)


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    """Data parallelism: N engine cores behind one endpoint (vLLM's flag names)."""
    g = p.add_argument_group("data parallelism")
    g.add_argument(
        "-dp",
        "--data-parallel-size",
        type=int,
        default=1,
        metavar="N",
        help="engine cores behind this endpoint, each with its own KV cache (default: 1)",
    )
    g.add_argument(
        "--data-parallel-backend",
        default="mp",
        choices=DP_BACKENDS,
        help="mp: processes on this machine; ray: Ray actors on the cluster at --ray-address "
        "(pip install 'heron[ray]') (default: %(default)s)",
    )
    g.add_argument(
        "--cpus-per-engine",
        type=int,
        default=None,
        metavar="N",
        help="CPUs (and threads) per engine; mp: pinned with affinity, default an even split "
        "of this machine; ray: the actor's CPUs, default all of the smallest node's",
    )
    g.add_argument(
        "--ray-address",
        default="auto",
        help="the Ray cluster to join (default: %(default)s, the one `ray start` runs here)",
    )
    g.add_argument(
        "--router",
        default="prefix",
        choices=ROUTERS,
        help="how requests pick an engine: prefix (where their prefix is likely cached, "
        "within a bounded imbalance) or round-robin (default: %(default)s)",
    )
    g.add_argument(
        "--data-parallel-max-restarts",
        type=int,
        default=3,
        metavar="N",
        help="ray: how many times Ray restarts an engine that died (default: %(default)s)",
    )


def parallel_config_from_args(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(
        data_parallel_size=args.data_parallel_size,
        backend=args.data_parallel_backend,
        cpus_per_engine=args.cpus_per_engine,
        ray_address=args.ray_address,
        router=args.router,
        max_restarts=args.data_parallel_max_restarts,
    )


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Model, cache and scheduler flags (vLLM's names) shared by engine-building commands."""
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer path (default: the model's)")
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE_OR_STRING",
        help="a Jinja chat template file, or the template text itself",
    )
    g.add_argument(
        "--hf-overrides",
        default=None,
        metavar="JSON",
        help="vLLM's flag, for a causal LM served as a reranker (Qwen3-Reranker): "
        '\'{"architectures": ["Qwen3ForSequenceClassification"], "classifier_from_token": '
        '["no", "yes"], "is_original_qwen3_reranker": true}\': /v1/score and /v1/rerank '
        "score sigmoid(logit_yes - logit_no); no other keys",
    )
    g.add_argument(
        "--grammar-index",
        default="start",
        choices=GRAMMAR_INDEX,
        help="when to index the tokenizer for structured outputs (2-4 s, ~280 MB): start = "
        "before the server is ready; first-use = on the first constrained request, which "
        "pauses running streams meanwhile (default: %(default)s)",
    )
    g.add_argument(
        "--gguf-memory",
        default="auto",
        choices=GGUF_MEMORY,
        help="where a GGUF file's blocks live: copy = read once into memory on 2 MiB pages "
        "(fewer TLB misses: a faster decode step), mapped = the file's pages (the OS page "
        "cache's, shared between processes); auto = copy where Linux has transparent huge "
        "pages and there is one engine (-dp 1), else mapped (default: %(default)s)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="weights and activations dtype (default: %(default)s: bfloat16 on CUDA and on CPUs "
        "with native bf16 matmuls, else float32)",
    )
    g.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="cuda if available, else cpu (default: auto)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length in tokens (default: the model's, capped by the KV cache)",
    )
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default: %(default)s)")
    g.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="auto: read the weights; dummy: random weights from the config, for benchmarking "
        "large shapes without their files (default: %(default)s)",
    )
    g.add_argument(
        "-q",
        "--quantization",
        default="auto",
        choices=QUANTIZATIONS,
        help="weight-only copies that serve small decode batches on CPU. int8: 8-bit codes per "
        "group of 32 (decode log-probs within ~0.02 nats of float); int4: 4-bit, faster and "
        "lossier; auto: int8 for GGUF checkpoints on CPU, none otherwise (default: %(default)s)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="most requests in one batch (default: %(default)s)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one engine step (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="KV cache size on CPU, e.g. 2GiB (default: 20%% of the RAM available after loading "
        "the weights, at most 2GiB)",
    )
    g.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="on CUDA: the fraction of free GPU memory for the KV cache (default: %(default)s)",
    )
    g.add_argument(
        "--block-size", type=int, default=16, help="tokens per KV block (default: %(default)s)"
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of shared prompt prefixes (default: on)",
    )


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    """vLLM's LoRA flags."""
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--enable-lora", action="store_true",
                   help="run PEFT LoRA adapters beside the base model's projections")
    g.add_argument(
        "--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
        help="adapters a request's model field can name: name=path, or vLLM's JSON "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\' (needs --enable-lora)')
    g.add_argument("--max-loras", type=int, default=1,
                   help="most distinct adapters among running requests (default: %(default)s)")
    g.add_argument("--max-lora-rank", type=int, default=16,
                   help="largest adapter rank accepted (default: %(default)s)")
    g.add_argument(
        "--allow-runtime-lora", action="store_true",
        default=os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (guarded by "
        "--api-key when set; default: $VLLM_ALLOW_RUNTIME_LORA_UPDATING)")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from ``add_engine_args`` flags (ValueError on bad values)."""
    model = ModelConfig(
        model=args.model,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        seed=args.seed,
        load_format=args.load_format,
        chat_template=args.chat_template,
        hf_overrides=getattr(args, "hf_overrides", None),
        quantization=args.quantization,
        grammar_index=getattr(args, "grammar_index", "start"),
        gguf_memory=gguf_memory_for(args.gguf_memory, getattr(args, "data_parallel_size", 1)),
    )
    cache = CacheConfig(
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    scheduler = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
    )
    return EngineConfig(model=model, cache=cache, scheduler=scheduler,
                        lora=lora_config_from_args(args))


def lora_config_from_args(args: argparse.Namespace) -> LoRAConfig:
    """LoRAConfig from the LoRA flags; each --lora-modules adapter's files and config checked
    now (ValueError: a clear error before the model loads)."""
    from heron.lora.adapter_config import check_adapter

    modules = lora_modules(getattr(args, "lora_modules", None) or [])
    config = LoRAConfig(enable_lora=getattr(args, "enable_lora", False),
                        max_loras=getattr(args, "max_loras", 1),
                        max_lora_rank=getattr(args, "max_lora_rank", 16), preload=modules)
    for request in modules:
        check_adapter(request, config.max_lora_rank)
    return config


def lora_modules(values: Sequence[str]) -> tuple[LoRARequest, ...]:
    """``--lora-modules`` words, ``name=path`` or a JSON object, as LoRARequests numbered 1.."""
    modules = []
    for i, value in enumerate(values, start=1):
        if value.lstrip().startswith("{"):
            modules.append(_json_lora_module(value, i))
            continue
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules: {value!r} is not name=path or a JSON object")
        modules.append(LoRARequest(name, i, path))
    return tuple(modules)


def _json_lora_module(value: str, lora_int_id: int) -> LoRARequest:
    try:
        spec = json.loads(value)
    except json.JSONDecodeError as e:
        raise ValueError(f"--lora-modules: cannot read {value!r} as JSON: {e}") from e
    fields = {"name", "path", "base_model_name"}
    if (not isinstance(spec, dict) or set(spec) - fields
            or not all(isinstance(spec.get(k), str) for k in ("name", "path"))):
        raise ValueError(f"--lora-modules: {value!r} needs string fields name and path, and "
                         "optionally base_model_name (no others)")
    return LoRARequest(spec["name"], lora_int_id, spec["path"], spec.get("base_model_name"))


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    if args.allow_runtime_lora and not args.enable_lora:
        raise ValueError("--allow-runtime-lora needs --enable-lora")
    return ServerConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        served_model_names=tuple(args.served_model_name or ()),
        allowed_origins=_origins(args.allowed_origins),
        allowed_hosts=tuple(args.allowed_hosts or ()),
        max_request_bytes=args.max_request_bytes,
        max_n=args.max_n,
        max_seqs_per_request=args.max_seqs_per_request,
        max_logprobs=args.max_logprobs,
        tool_call_parser=args.tool_call_parser,
        reasoning_parser=args.reasoning_parser,
        pooling=args.pooling,
        enable_web_ui=not args.disable_web_ui,
        allow_runtime_lora=args.allow_runtime_lora,
    )


def _origins(values: list[str] | None) -> tuple[str, ...]:
    """'--allowed-origins a b' or vLLM's JSON form '--allowed-origins ["a", "b"]'."""
    if not values:
        return ()
    if len(values) == 1 and values[0].lstrip().startswith("["):
        try:
            parsed = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise ValueError(
                f"--allowed-origins: cannot read {values[0]!r} as a JSON list: {e}"
            ) from e
        return tuple(str(v) for v in parsed)
    return tuple(values)


def _run_serve(args: argparse.Namespace) -> int:
    level = getattr(logging, args.log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine_config = engine_config_from_args(args)
    server_config = server_config_from_args(args)
    parallel_config = parallel_config_from_args(args)
    if parallel_config.backend == "ray":
        from heron.engine.dp_ray import require_ray

        require_ray()  # a clear error now, not after loading anything
    from heron.server.launch import run_server

    return run_server(
        engine_config,
        server_config,
        log_level=level,
        access_log=not args.disable_uvicorn_access_log,
        parallel_config=parallel_config,
    )


# ==== heron chat ==================================================================================


def _add_chat_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal",
        description="Chat with a model in the terminal: loaded in this process, or behind a "
        "running server (--url).",
        epilog=_CHAT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="a model directory or GGUF file to load (default: the embedded Gemma 3 270M); "
        "with --url: the server's model name (default: its first)",
    )
    c = p.add_argument_group("chat")
    c.add_argument("--url", default=None, help="talk to this server instead of loading a model")
    c.add_argument(
        "--api-key",
        default=os.environ.get("HERON_API_KEY") or None,
        help="the server's API key, with --url (default: $HERON_API_KEY)",
    )
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--temperature", type=float, default=0.7, help="(default: %(default)s)")
    c.add_argument("--top-p", type=float, default=1.0, help="(default: %(default)s)")
    c.add_argument(
        "--max-tokens", type=int, default=None, help="per answer (default: up to the context)"
    )
    c.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )
    add_engine_args(p)
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from heron.chat_cli import ChatError, ChatSettings, LocalChat, RemoteChat, run_chat

    settings = ChatSettings(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens
    )
    try:
        if args.url:
            backend: LocalChat | RemoteChat = RemoteChat(args.url, args.api_key, args.model)
        else:
            backend = LocalChat.load(engine_config_from_args(args))
    except (ChatError, OSError) as e:
        print(f"heron chat: {e}", file=sys.stderr)
        return 1
    return run_chat(backend, settings, system=args.system)


# ==== heron bench =================================================================================


def _add_bench_parser(sub: argparse._SubParsersAction, with_benchmarks: bool) -> None:
    """``heron bench COMMAND``: each benchmark module registers its own subcommand here
    (``with_benchmarks``; else ``bench`` is only listed)."""
    p = sub.add_parser("bench", help="benchmarks", description="Benchmarks.")
    bench_sub = p.add_subparsers(dest="bench_command", metavar="COMMAND", required=True)
    if not with_benchmarks:
        return
    from heron.bench import peers, serve, throughput

    serve.add_parser(bench_sub)
    throughput.add_parser(bench_sub)
    peers.add_parser(bench_sub)


if __name__ == "__main__":
    sys.exit(main())
