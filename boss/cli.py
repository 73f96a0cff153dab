"""The ``boss`` command: parse, call the service, render. Nothing else.

Data goes to stdout (tables, ids, ``--json``); messages go to stderr.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from boss import (
    cli_observe,
    keys,
    providers,
    render,
    server,
    startup,
)
from boss.cli_app import _boss, _json, admin, app, dbapp, out
from boss.errors import UserError
from boss.providers import Created, Failed, provider_for
from boss.scaler import Scaler
from protocol.console import err, main_for
from protocol.errors import SettingsError
from protocol.settings import hide_password


@app.command()
def init(ctx: typer.Context) -> None:
    """Create the database (SQLite file by default) and apply all migrations."""
    boss = _boss(ctx)
    boss.init()
    err.print(f"database ready: {boss.database}", markup=False)


@app.command("push-tasks")
def push_tasks(
    ctx: typer.Context,
    file: str = typer.Argument(..., help="JSON array or JSON lines file; '-' for stdin."),
    skip_existing: bool = typer.Option(
        False, "--skip-existing", help="Keep tasks whose name already exists; push the rest."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Push tasks: every task in the file, or none (all errors are listed)."""
    boss = _boss(ctx)
    result = boss.push(None if file == "-" else Path(file), skip_existing=skip_existing)
    if as_json:
        _json(result.__dict__)
        return
    out.print(result.pushed)
    err.print(f"pushed {result.pushed} tasks ({result.ready} ready, {result.edges} "
              f"dependencies" + (f", {result.skipped} existing skipped)" if result.skipped
                                 else ")"))


@app.command("tasks")
def list_tasks(
    ctx: typer.Context,
    state: str | None = typer.Option(None, "--state", help="Only tasks in this state."),
    after: int = typer.Option(0, "--after", help="Page: tasks with id greater than this."),
    limit: int = typer.Option(100, "--limit", min=1, max=100_000, help="Page size."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """List tasks, a page at a time (--after the last id shown for the next page)."""
    rows = _boss(ctx).tasks(state, after, limit)
    if as_json:
        _json(rows)
        return
    out.print(render.tasks_table(rows))
    if len(rows) == limit:
        err.print(f"more: boss tasks --after {rows[-1]['id']}"
                  + (f" --state {state}" if state else ""))


@app.command()
def show(
    ctx: typer.Context,
    task: str = typer.Argument(..., help="Task name."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """One task: document, state, attempts, dependencies."""
    data = _boss(ctx).show(task)
    if as_json:
        _json(data)
        return
    render.task_detail(out, data)


@app.command()
def retry(
    ctx: typer.Context,
    tasks: list[str] = typer.Argument(None, help="Task names."),
    failed: bool = typer.Option(False, "--failed", help="Retry every failed task."),
) -> None:
    """Put failed, upstream_failed or cancelled tasks back in the queue."""
    if bool(tasks) == failed:
        raise UserError("name the tasks to retry, or pass --failed (not both)")
    n = _boss(ctx).retry(None if failed else tasks)
    out.print(n)
    err.print(f"{n} tasks back in the queue")


@app.command()
def cancel(ctx: typer.Context, task: str = typer.Argument(..., help="Task name.")) -> None:
    """Cancel a task; a running attempt is stopped at its worker's next heartbeat."""
    was = _boss(ctx).cancel(task)
    err.print(f"cancelled {task} (was {was}); tasks depending on it are upstream_failed",
              markup=False)


cli_observe.register(app)  # watch, events, logs, why, report


@admin.command()
def status(ctx: typer.Context,
           as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """Counts of tasks by state, workers by state, and the context."""
    data = _boss(ctx).status()
    if as_json:
        _json(data)
        return
    render.status(out, data)


@admin.command("show-context")
def show_context(ctx: typer.Context,
                 as_json: bool = typer.Option(False, "--json", help="Print as JSON.")) -> None:
    """The Context table: datastore, buckets, boss address."""
    boss = _boss(ctx)
    # bucket URLs may hold a password: workers get them whole, screens and logs do not
    data = {k: hide_password(v) for k, v in boss.context().items()}
    buckets, default = boss.buckets()
    buckets = {k: hide_password(v) for k, v in buckets.items()}
    default = hide_password(default)
    if as_json:
        _json({"context": data, "buckets": buckets, "datastore": default})
        return
    # keys and URLs are user input: Text cells are never read as rich markup
    table = Table("key", "value", title="context")
    for k, v in data.items():
        table.add_row(Text(k), Text(v))
    out.print(table)
    btable = Table("bucket", "url", title="buckets in effect")
    for k, v in sorted(buckets.items()):
        btable.add_row(Text(k), Text(v))
    out.print(btable)


@admin.command("set-datastore")
def set_datastore(ctx: typer.Context, url: str = typer.Argument(
        ..., help="file:///path, sftp://user@host/path, s3://bucket/prefix or gs://bucket")
        ) -> None:
    """Set the datastore: the URL of the default bucket."""
    _boss(ctx).set_datastore(url)
    err.print(f"datastore set to {url}", markup=False)


@admin.command("set-bucket")
def set_bucket(ctx: typer.Context, name: str = typer.Argument(..., help="Bucket name."),
               url: str = typer.Argument(..., help="Datastore URL for it.")) -> None:
    """Map a bucket name (as in `name:path` in documents) to a datastore URL."""
    _boss(ctx).set_bucket(name, url)
    err.print(f"bucket {name} -> {url}", markup=False)


@admin.command("drop-context")
def drop_context(ctx: typer.Context, keys: list[str] = typer.Argument(
        None, help="Keys to drop (default: all).")) -> None:
    """Drop context keys (all of them by default), as ecloud's drop_context."""
    n = _boss(ctx).drop_context(keys or None)
    err.print(f"dropped {n} context keys")


cli_observe.register_admin(admin)  # prune-events


@admin.command("show-workers")
def show_workers(
    ctx: typer.Context,
    all_: bool = typer.Option(False, "--all", help="Include terminated workers."),
    as_json: bool = typer.Option(False, "--json", help="Print as JSON."),
) -> None:
    """Workers: provider, state, address, slots, last seen, current tasks."""
    rows = _boss(ctx).workers(include_terminated=all_)
    if as_json:
        _json(rows)
        return
    out.print(render.workers_table(rows))


@admin.command("add-worker")
def add_worker(
    ctx: typer.Context,
    token_file: Path = typer.Option(..., "--token-file", help="Write the new token here."),
    name: str | None = typer.Option(None, "--name", help="Worker name (default generated)."),
    slots: int = typer.Option(1, "--slots", min=1, help="Slots the worker will offer."),
) -> None:
    """Register a worker you start yourself; its token goes to --token-file (0600)."""
    wid, wname, token = _boss(ctx).add_worker(name, "manual", slots)
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.touch(mode=0o600, exist_ok=True)
    token_file.chmod(0o600)
    token_file.write_text(token + "\n")
    out.print(wid)
    err.print(f"worker {wname} registered; token in {token_file}", markup=False)


@admin.command("authorize-worker-key")
def authorize_worker_key(
    ctx: typer.Context,
    public_key: Path | None = typer.Option(
        None, "--public-key", help="The worker's public key file (.pub)."),
    generate: Path | None = typer.Option(
        None, "--generate", help="Generate a new worker key pair in this directory instead."),
    install: bool = typer.Option(
        False, "--install", help="Append the line to [boss] authorized_keys "
        "(replacing an older line for the same key)."),
    authorized_keys: Path | None = typer.Option(
        None, "--authorized-keys", help="The authorized_keys file for --install "
        "(default: [boss] authorized_keys)."),
) -> None:
    """Print (or install) the restricted authorized_keys line for a worker's SSH key.

    The key may open one tunnel to the boss's RPC port and nothing else: no
    shell, no exec, no SFTP, no other forwards.
    """
    settings = ctx.obj["settings"]
    if (public_key is None) == (generate is None):
        raise UserError("give exactly one of --public-key FILE or --generate DIR")
    if generate is not None:
        private, line = keys.generate_worker_keypair(generate)
        err.print(f"worker key pair written: {private} (give it to the worker) and {private}.pub")
    else:
        assert public_key is not None
        try:
            line = public_key.read_text()
        except OSError as exc:
            raise UserError(f"cannot read the public key {public_key}: {exc.strerror}") from exc
    port = int(settings.boss.listen.rpartition(":")[2])
    entry = keys.authorized_keys_line(line, port)
    if install:
        path = (authorized_keys or Path(settings.boss.authorized_keys)).expanduser()
        changed = keys.install_authorized_key(path, entry)
        err.print(f"{'installed in' if changed else 'already in'} {path}")
    out.print(entry, markup=False)


@app.command("serve")
def serve(
    ctx: typer.Context,
    autoscale: bool | None = typer.Option(
        None, "--autoscale/--no-autoscale",
        help="Start and stop workers for the backlog with [provider] default "
             "(default: [autoscale] enabled)."),
) -> None:
    """Run the RPC server for workers on [boss] listen (127.0.0.1 only), the lease reaper
    and the autoscaler.

    Runs until interrupted (Ctrl-C or SIGTERM); the workers it started are stopped.
    """
    boss = _boss(ctx)
    boss.store.check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s",
                        stream=sys.stderr)
    settings = ctx.obj["settings"]
    scaling = settings.autoscale.enabled if autoscale is None else autoscale
    scaler = Scaler(boss, provider_for(settings)) if scaling else None
    server.serve(boss, scaler=scaler, on_ready=lambda port: err.print(
        f"boss serving workers on 127.0.0.1:{port} (database {boss.store.engine.url!r}"
        + (f", autoscaling {settings.provider.default} workers up to "
           f"{settings.autoscale.max_workers})" if scaler else ", no autoscaling)")))


@app.command("instantiate-worker")
def instantiate_worker(
    ctx: typer.Context,
    count: int = typer.Argument(1, min=1, max=10_000, help="How many workers."),
    provider: str | None = typer.Option(None, "--provider",
                                        help="local, ssh or gce (default [provider] default)."),
    slots: int | None = typer.Option(None, "--slots", min=1, max=1024,
                                     help="Slots per worker (default [worker] slots)."),
    spot: bool = typer.Option(False, "--spot", help="Spot / preemptible instances (gce)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be sent or run "
                                 "(one JSON object a line); create nothing."),
) -> None:
    """Start workers now (ecloud's instantiate_worker); each gets its own token.

    Local workers reach the boss's RPC port, so run `boss serve` too.
    """
    settings = ctx.obj["settings"]
    prov = provider_for(settings, provider)
    if dry_run:
        for item in providers.dry_run(prov, count, slots or settings.worker.slots, spot):
            out.print(json.dumps(item, sort_keys=True), markup=False)
        err.print(f"dry run: {count} {prov.name} worker(s) not created")
        return
    results = _boss(ctx).instantiate(count, prov, slots or settings.worker.slots, spot)
    created = [r for r in results if isinstance(r, Created)]
    for c in created:
        out.print(c.worker_id)
    for f in results:
        if isinstance(f, Failed):
            err.print(Text(f"worker {f.worker_id} not created: {f.error}"))
    err.print(f"{len(created)} of {count} {prov.name} worker(s) started")
    if not created:
        raise typer.Exit(1)


@app.command("terminate-worker")
def terminate_worker(
    ctx: typer.Context,
    workers: list[str] = typer.Argument(None, help="Worker ids or names."),
    all_: bool = typer.Option(False, "--all", help="Every live worker."),
) -> None:
    """Stop workers and delete their instances; their running tasks are requeued."""
    if bool(workers) == all_:
        raise UserError("give worker ids or names, or --all")
    settings = ctx.obj["settings"]
    names = _boss(ctx).terminate(None if all_ else workers,
                                 lambda name: provider_for(settings, name))
    err.print(f"terminated {len(names)} worker(s)")


@app.command("import-wfcommons")
def import_wfcommons(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="A WfCommons instance (JSON, schemaVersion 1.4, "
                                "1.5 or 1.6)."),
    time_scale: float = typer.Option(1.0, "--time-scale", min=0.0,
                                     help="Each task sleeps its recorded runtime times this."),
    size_scale: float = typer.Option(1.0, "--size-scale", min=0.0, help="Each file is "
                                     "written at its recorded size times this."),
    prefix: str | None = typer.Option(None, "--prefix", help="Tasks are PREFIX/TASK, files "
                                      "data:wf/PREFIX/FILE (default: the file's name "
                                      "without .json)."),
    slots: int | None = typer.Option(None, "--slots", min=1, help="Slots the lower bound "
                                     "assumes (default [worker] slots)."),
    no_inputs: bool = typer.Option(False, "--no-inputs", help="Do not create the "
                                   "workflow's input files in the datastore."),
    skip_existing: bool = typer.Option(False, "--skip-existing", help="Keep tasks whose "
                                       "name already exists; push the rest."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Push a WfCommons workflow as tasks replaying its runtimes and files; print the
    lower bound max(critical path, total work / slots).

    The files no task writes (the workflow's inputs) are written to the datastore
    first, at their scaled size. The push is all or nothing, as push-tasks.
    """
    import tempfile

    from boss import wfcommons
    from boss.errors import PushError

    wf = wfcommons.load(file)
    name = prefix or wfcommons.default_prefix(file)
    conv = wfcommons.convert(wf, time_scale=time_scale, size_scale=size_scale, prefix=name)
    boss = _boss(ctx)
    boss.store.check()  # before writing inputs for a push that could not happen
    created, nbytes = (0, 0) if no_inputs else wfcommons.create_inputs(conv.inputs,
                                                                       *boss.buckets())
    with tempfile.TemporaryDirectory(prefix="ecloud-wfcommons-") as tmp:
        jsonl = Path(tmp) / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(d) + "\n" for d in conv.documents),
                         encoding="utf-8")
        try:
            result = boss.push(jsonl, skip_existing=skip_existing)
        except PushError as exc:  # name the instance, not the temporary file
            raise PushError(f"{file} (as {name}/...)", exc.problems, exc.total) from None
    n = slots or ctx.obj["settings"].worker.slots
    figures = {"pushed": result.pushed, "skipped": result.skipped, "ready": result.ready,
               "edges": result.edges, "prefix": name, "schema_version": wf.schema,
               "time_scale": time_scale, "size_scale": size_scale,
               "inputs": len(conv.inputs), "inputs_created": created,
               "input_bytes_written": nbytes,
               "critical_path_seconds": conv.critical_path,
               "total_work_seconds": conv.total_work, "slots": n,
               "work_per_slot_seconds": conv.total_work / n,
               "lower_bound_seconds": conv.bound(n)}
    if as_json:
        _json(figures)
    else:
        table = Table("figure", "value")
        for k, v in figures.items():
            shown = (f"{v:.3f}" if k.endswith("_seconds") else f"{v:g}") if isinstance(
                v, float) else str(v)
            table.add_row(k, Text(shown))
        out.print(table)
    err.print(Text(f"pushed {result.pushed} tasks of {file} as {name}/... ({result.ready} "
                   f"ready, {result.edges} dependencies); {created} of {len(conv.inputs)} "
                   f"input files written; lower bound on {n} slots "
                   f"{conv.bound(n):.1f} s"))


@app.command("worker-script")
def worker_script(ctx: typer.Context) -> None:
    """Print the startup script a fresh VM runs on boot to become a worker."""
    from importlib.metadata import version

    out.print(startup.worker_script(ctx.obj["settings"], version("ecloud")), markup=False,
              end="")


@app.command("run")
def run(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="Tasks: JSON array or JSON lines."),
    workers: int = typer.Option(2, "--workers", min=1, max=256, help="Local workers, at most."),
    slots: int | None = typer.Option(None, "--slots", min=1, max=1024,
                                     help="Slots per worker (default [worker] slots)."),
    skip_existing: bool = typer.Option(False, "--skip-existing",
                                       help="Keep tasks already pushed (re-run a pipeline)."),
) -> None:
    """Push FILE and run it to the end on local workers, with live progress.

    Starts the server (on a free port), pushes, starts up to --workers local
    workers, shows progress, stops everything when nothing is left to run.
    Exit status 0 when every task succeeded, 1 otherwise.
    """
    settings = ctx.obj["settings"]
    boss = _boss(ctx)
    boss.init()
    pushed = boss.push(file, skip_existing=skip_existing)
    err.print(f"pushed {pushed.pushed} task(s), {pushed.skipped} already there")
    settings.autoscale.max_workers = workers
    settings.autoscale.min_workers = 0
    settings.autoscale.idle_seconds = 0
    if slots:
        settings.worker.slots = slots
    scaler = Scaler(boss, provider_for(settings, "local"))
    with server.serving(boss, 0, scaler):
        counts = render.follow(err, boss.progress)
    failed = {k: v for k, v in counts.items()
              if k in ("failed", "upstream_failed", "cancelled") and v}
    _, default = boss.buckets()
    out.print(json.dumps({"tasks": {k: v for k, v in counts.items() if v}, "datastore": default,
                          "logs": f"{default}/ecloud-logs/"}), markup=False)
    if failed:
        for row in boss.tasks(state="failed", limit=20):
            err.print(Text(f"failed: {row['name']}: {row['reason'] or ''}"))
        raise typer.Exit(1)


@dbapp.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Apply migrations up to the newest (alembic upgrade head)."""
    _boss(ctx).init()
    err.print("database at the newest schema")


main = main_for(app, (UserError, SettingsError), "boss")

if __name__ == "__main__":
    main()
    sys.exit(0)
