"""The ``toolkit`` command line."""

from __future__ import annotations

import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from toolkit.buildsys.buildlog import NOISY_LOGGERS
from toolkit.buildsys.config import BuildConfig, load_config
from toolkit.buildsys.report import StageStatus
from toolkit.errors import ConfigError, ToolkitError

app = typer.Typer(
    help="Fine-tune a chat model and ship it to NVIDIA Triton.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect the build config.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="Build config (YAML or TOML); defaults apply without it.")
]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=True)],
        force=True,
    )
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(err: ToolkitError) -> typer.Exit:
    console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=err.exit_code)


def _override(config: BuildConfig, **paths: Path | None) -> BuildConfig:
    updates: dict[str, object] = {}
    if paths.get("workspace") is not None:
        updates["workspace"] = paths["workspace"]
    if paths.get("output") is not None:
        updates["repository"] = config.repository.model_copy(update={"output": paths["output"]})
    return config.model_copy(update=updates) if updates else config


@app.command()
def build(
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun the selected stages even if cached.")] = False,
    stages: Annotated[
        str | None, typer.Option("--stages", help="Comma-separated stages to run; the rest must be cached.")
    ] = None,
    until: Annotated[str | None, typer.Option("--until", help="Stop after this stage.")] = None,
    workspace: Annotated[Path | None, typer.Option("--workspace", help="Build directory (default build/).")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Model repository to write.")] = None,
    keep_versions: Annotated[
        int | None, typer.Option("--keep-versions", min=1, help="Model versions kept in the repository.")
    ] = None,
    junit_xml: Annotated[
        Path | None, typer.Option("--junit-xml", help="Also write every stage and gate as a JUnit test case (CI).")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show every log line on the terminal, not only in build.log.")
    ] = False,
) -> None:
    """Fine-tune, merge, export, quantize and package a chat model into a Triton model repository.

    The terminal shows the stages and gates; ``<workspace>/build.log`` holds everything else.
    """
    from toolkit.buildsys.buildlog import LOG_FILE, build_logging
    from toolkit.stages.pipeline import STAGE_NAMES, run_build

    try:
        cfg = _override(load_config(config), workspace=workspace, output=output)
    except ToolkitError as err:
        raise _fail(err) from None
    if keep_versions is not None:
        cfg = cfg.model_copy(update={"repository": cfg.repository.model_copy(update={"keep_versions": keep_versions})})
    only = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    log_path = cfg.workspace / LOG_FILE
    started_ns = time.time_ns()
    try:
        with build_logging(cfg.workspace, verbose=verbose):
            report = run_build(cfg, force=force, only=only, until=until)
    except ToolkitError as err:
        _write_junit(cfg.workspace, junit_xml, started_ns, str(err))
        console.print(f"full log: {log_path}", highlight=False, soft_wrap=True)
        raise _fail(err) from None
    except KeyboardInterrupt:
        _write_junit(cfg.workspace, junit_xml, started_ns, "interrupted by the user")
        console.print("[yellow]interrupted[/]: finished stages are kept; rerun to continue.")
        raise typer.Exit(code=130) from None
    _write_junit(cfg.workspace, junit_xml, started_ns)
    ran = [s.name for s in report.stages if s.status == StageStatus.RAN]
    skipped = [s.name for s in report.stages if s.status == StageStatus.SKIPPED]
    console.print(
        f"[bold green]build passed[/] in {report.duration_s:.1f} s: ran {len(ran)}, "
        f"skipped {len(skipped)} of {len(STAGE_NAMES)} stages; report: {cfg.workspace / 'report.md'}; "
        f"log: {log_path}", highlight=False, soft_wrap=True,
    )


def _write_junit(workspace: Path, path: Path | None, started_ns: int, error: str | None = None) -> None:
    """The JUnit XML of the report this build left in `workspace`, whatever its outcome."""
    if path is None:
        return
    from toolkit.buildsys.junit import write_junit
    from toolkit.buildsys.report import BuildReport, BuildStatus

    saved = workspace / "report.json"
    if saved.is_file() and saved.stat().st_mtime_ns >= started_ns:
        report = BuildReport.model_validate_json(saved.read_text(encoding="utf-8"))
    else:  # stopped before its first report (a bad --stages): one failed case says why
        report = BuildReport(config_sha256="", config={}, started_at=dt.datetime.now(dt.UTC).isoformat(),
                             status=BuildStatus.FAILED, error=error or "the build wrote no report")
    write_junit(report, path)
    console.print(f"JUnit XML: {path}", highlight=False, soft_wrap=True)


def _port(value: str, option: str) -> int | None:
    from toolkit.supervisor.ports import parse_port

    try:
        return parse_port(value, option)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@app.command()
def serve(
    repository: Annotated[Path, typer.Option("--repository", "-r", help="Triton model repository.")] = Path(
        "model_repository"),
    triton_only: Annotated[bool, typer.Option("--triton-only", help="Start Triton without the gateway.")] = False,
    host: Annotated[str, typer.Option("--host", help="Address every server binds to.")] = "127.0.0.1",
    http_port: Annotated[str, typer.Option("--http-port", help="Triton HTTP port, or auto.", metavar="PORT|auto")] = (
        "8000"),
    grpc_port: Annotated[str, typer.Option("--grpc-port", help="Triton gRPC port, or auto.", metavar="PORT|auto")] = (
        "8001"),
    metrics_port: Annotated[
        str, typer.Option("--metrics-port", help="Triton metrics port, or auto.", metavar="PORT|auto")] = "8002",
    gateway_port: Annotated[
        str, typer.Option("--port", "--gateway-port", help="Gateway HTTP port, or auto (a free one).",
                          metavar="PORT|auto")] = "8080",
    reuse: Annotated[bool, typer.Option(
        "--reuse", help="If a server for this repository runs already, attach to it (Ctrl-C detaches).")] = False,
    log_dir: Annotated[Path, typer.Option(
        "--log-dir", help="Where the server logs and the state file (state.json) go.")] = Path("build/serve"),
    replicas: Annotated[int, typer.Option(
        "--replicas", min=1, help="Triton processes behind the one gateway; replica i's ports are the given ones "
        "plus 3*i (auto: each picked free).")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve a model repository: Triton (explicit model control) and the gateway; Ctrl-C stops both.

    If a toolkit server for the same repository already runs (its state file is in --log-dir), this
    says where and exits 0; a port held by anything else is an error that names the process.
    """
    _setup_logging(verbose)
    from toolkit.supervisor.serve import ServeOptions, ServeOutcome
    from toolkit.supervisor.serve import serve as run_serve

    try:
        options = ServeOptions(
            repository=repository, host=host, http_port=_port(http_port, "--http-port"),
            grpc_port=_port(grpc_port, "--grpc-port"), metrics_port=_port(metrics_port, "--metrics-port"),
            gateway_port=_port(gateway_port, "--port"), triton_only=triton_only, log_dir=log_dir, reuse=reuse,
            replicas=replicas)
        outcome = run_serve(options, say=lambda line: console.print(line, highlight=False, soft_wrap=True,
                                                                   markup=False))
    except ToolkitError as err:
        raise _fail(err) from None
    if outcome is ServeOutcome.ALREADY_RUNNING:
        raise typer.Exit(code=0)


@app.command()
def chat(
    message: Annotated[str | None, typer.Option(
        "--message", "-m", help="Answer this once and exit ('-' reads the question from standard input).")] = None,
    url: Annotated[str | None, typer.Option(
        "--url", help="Gateway URL; default: the running toolkit serve, else one started here for the chat.")] = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="TOOLKIT_API_KEY", help="Bearer key, for gateways with auth on.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Model to answer with (default: the gateway's).")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    temperature: Annotated[float | None, typer.Option("--temperature", min=0.0, max=2.0)] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", min=1, help="Most tokens in one answer.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With -m: print one JSON object (content, usage).")] = False,
    repository: Annotated[Path, typer.Option(
        "--repository", "-r", help="Repository to serve when nothing runs.")] = Path("model_repository"),
    log_dir: Annotated[Path, typer.Option(
        "--log-dir", help="Where a running server's state file is, and a started one logs.")] = Path("build/serve"),
    ready_timeout_s: Annotated[float, typer.Option("--ready-timeout", help="Seconds to wait for a start.")] = 300.0,
) -> None:
    """Chat with the served model in the terminal; starts (and later stops) a server when none runs."""
    import signal

    from toolkit.terminal_chat.gateway_client import GatewayClient
    from toolkit.terminal_chat.launcher import Backend, connect
    from toolkit.terminal_chat.repl import ChatRepl, one_shot
    from toolkit.terminal_chat.session import ChatSession

    def note(text: str) -> None:
        console.print(f"[dim]{escape(text)}[/]", highlight=False, soft_wrap=True)

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # through every `finally`, so a server started here is stopped

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)
    backend: Backend | None = None
    try:
        if as_json and message is None:
            raise ConfigError("--json needs a question (-m QUESTION, or -m - to read it from standard input)")
        question = sys.stdin.read().strip() if message == "-" else message
        if question is not None and not question.strip():
            raise ConfigError("the question is empty" + (" (standard input held nothing)" if message == "-" else ""))
        with console.status("connecting…") as status:
            def progress(line: str) -> None:
                note(line)
                status.update(line[:80])

            backend = connect(url, repository, log_dir, ready_timeout_s=ready_timeout_s, say=note, progress=progress)
        with GatewayClient(backend.url, api_key) as client:
            repl = ChatRepl(client, ChatSession(model=model, system=system, temperature=temperature,
                                                max_tokens=max_tokens), Console(), console)
            if question is not None:
                one_shot(repl, question, as_json)
                return
            note(f"chatting with {backend.url} (/help lists the commands; Ctrl-D leaves)")
            try:
                repl.list_models()
            except ToolkitError as err:
                repl.error(str(err))
            repl.run()
    except ToolkitError as err:
        raise _fail(err) from None
    except KeyboardInterrupt:
        raise typer.Exit(code=130) from None
    finally:
        if backend is not None:
            backend.stop(note)


@config_app.command("show")
def config_show(
    config: ConfigOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json")] = "yaml",
) -> None:
    """Print the effective build config (defaults merged with the file)."""
    try:
        cfg = load_config(config)
    except ToolkitError as err:
        raise _fail(err) from None
    data = cfg.model_dump(mode="json")
    if fmt == "json":
        sys.stdout.write(cfg.model_dump_json(indent=2) + "\n")
    elif fmt == "yaml":
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    else:
        raise _fail(ToolkitError(f"--format must be yaml or json, not {fmt!r}"))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
