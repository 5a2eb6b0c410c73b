"""``wanrender models random``: the progress display and the summary around
``models.random_files`` (which does the work)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console


def random_command(folder: Path, size: str, seed: int, device: str, overwrite: bool, console: Console) -> None:
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
    from rich.table import Table

    from wanrender.models.inventory import human_size
    from wanrender.models.random_files import pick_device, write_random_set

    bar = Progress(
        TextColumn("{task.description:<18}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeElapsedColumn(), console=console, transient=False,
    )  # fmt: skip
    overall: list[int] = []
    tasks: dict[str, int] = {}

    def on_event(event: str, f, n: int) -> None:
        if event == "plan":  # everything was checked: no banner before a one-line refusal
            console.print(
                f"Writing [bold]random-weight[/] stand-ins for the standard file set ({size} size, seed {seed}, "
                f"generated on {pick_device(device).type}) into {folder}: {n / 1e9:.2f} GB ...",
                highlight=False,
            )
            overall.append(bar.add_task("[bold]all files", total=n, visible=n > 0))
        elif event == "skip":
            console.print(f"  {f.dest}: already there (same seed and size), skipped", highlight=False)
        elif event == "start":
            tasks[f.dest] = bar.add_task(f.role, total=f.total_bytes)
        elif event == "bytes":
            bar.advance(tasks[f.dest], n)
            bar.advance(overall[0], n)
        elif event == "done":
            bar.update(tasks[f.dest], completed=f.total_bytes)

    with bar:
        outcomes = write_random_set(folder, size, seed, device, overwrite, progress=on_event)
    table = Table(title=f"Random-weight files in {folder}", title_justify="left")
    for col in ("file", "role", "size", "status"):
        table.add_column(col, overflow="fold")
    for o in outcomes:
        took = f" in {o.seconds:.1f} s" if o.status == "written" else ""
        table.add_row(o.file.dest, o.file.role, human_size(o.file.total_bytes), o.status + took)
    out = Console()
    out.print(table)
    out.print(
        "These are RANDOM weights: renders run the real loaders, LoRA merge and pipeline at this size, "
        "but the video is noise. Use them with:",
        highlight=False,
    )
    out.print(f"  wanrender generate IMAGE --prompt '...' --models {folder}", highlight=False, soft_wrap=True)
