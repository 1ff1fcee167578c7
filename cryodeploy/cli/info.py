"""``cryodeploy info``: versions, devices and backends."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(as_json: bool) -> None:
    """Show package versions, devices, and which backends can run here."""
    from cryodeploy.sysinfo import system_info

    data = system_info()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo("versions:")
    for name, ver in data["versions"].items():
        click.echo(f"  {name:16s} {ver or 'not installed'}")
    click.echo("devices:")
    for dev in data["devices"]:
        extra = ", ".join(f"{k}={v}" for k, v in dev.items() if k != "device")
        click.echo(f"  {dev['device']:16s} {extra}")
    click.echo("backends:")
    for name, b in data["backends"].items():
        click.echo(f"  {name:16s} " + ("available" if b["available"] else f"unavailable: {b['reason']}"))
