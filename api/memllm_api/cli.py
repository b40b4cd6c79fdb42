"""``memllm serve`` and ``memllm keys``: run the HTTP server, manage API keys."""

from __future__ import annotations

import asyncio

import click

from memllm.cli_common import CliError, friendly_errors
from memllm.settings import get_settings


@click.command()
@click.option("--host", default=None, help="address to bind (default 127.0.0.1; MEMLLM_API_HOST)")
@click.option("--port", type=int, default=None, help="port (default 8000; MEMLLM_API_PORT)")
@click.option("--auth", type=click.Choice(["auto", "on", "off"]), default=None, help="API keys (auto: off on loopback)")
@click.option("--no-demo", is_flag=True, help="do not create the demo knowledge base")
@friendly_errors(on_interrupt="server stopped")
def serve(host: str | None, port: int | None, auth: str | None, no_demo: bool) -> None:
    """Serve the HTTP API and the web page (OpenAI-compatible under /v1)."""
    import uvicorn

    from memllm_api.app import create_app
    from memllm_api.config import ApiSettings

    api = ApiSettings.from_env(host=host, port=port, auth=auth, demo_kb=False if no_demo else None)
    app = create_app(get_settings(), api)
    shown = f"[{api.host}]" if ":" in api.host else api.host
    auth_note = "API keys required" if api.auth_required else "no API key needed (loopback)"
    click.echo(f"memllm: serving on http://{shown}:{api.port}/  ({auth_note}; docs at /schema)", err=True)
    uvicorn.run(app, host=api.host, port=api.port, log_level="warning", timeout_graceful_shutdown=10)


@click.group()
def keys() -> None:
    """API keys: each belongs to a tenant, whose knowledge bases and sessions it reaches."""


def _run(work):
    """``work(db session)`` against the configured database (migrated first, as the server does)."""
    from memllm_api.core import migrate_database
    from memllm_storage.store import MemoryStore

    async def main():
        await migrate_database(get_settings())
        store = await MemoryStore.from_settings(get_settings())
        try:
            async with store.sessions() as db:
                out = await work(db)
                await db.commit()
                return out
        finally:
            await store.close()

    return asyncio.run(main())


@keys.command("create")
@click.option("--tenant", required=True, help="tenant name (created if new)")
@click.option("--name", default="", help="a label for the key")
@friendly_errors
def keys_create(tenant: str, name: str) -> None:
    """Create a key for TENANT; the key is printed once (only its hash is stored)."""
    from memllm_storage.repositories import ApiKeyRepository, TenantRepository

    if not tenant.strip():
        raise CliError("the tenant name is empty")

    async def work(db):
        tenants = TenantRepository(db)
        row = await tenants.get_by_name(tenant) or await tenants.create(tenant)
        _key, plaintext = await ApiKeyRepository(db).create(row.id, name)
        return plaintext

    click.echo(_run(work))


@keys.command("list")
@click.option("--tenant", required=True)
@friendly_errors
def keys_list(tenant: str) -> None:
    """The tenant's keys (prefix, label, state)."""
    from memllm_storage.repositories import ApiKeyRepository, TenantRepository

    async def work(db):
        row = await TenantRepository(db).get_by_name(tenant)
        if row is None:
            raise CliError(f"no tenant named {tenant!r}")
        return [(k.id, k.prefix, k.name, k.revoked_at) for k in await ApiKeyRepository(db).list(row.id)]

    for key_id, prefix, label, revoked in _run(work):
        state = f"revoked {revoked:%Y-%m-%d}" if revoked else "active"
        click.echo(f"{key_id:>5}  {prefix}…  {state:<18} {label}")


@keys.command("revoke")
@click.argument("key_id", type=int)
@friendly_errors
def keys_revoke(key_id: int) -> None:
    """Revoke key KEY_ID (see keys list); requests with it answer 401 from then on."""
    from memllm_storage.repositories import ApiKeyRepository

    async def work(db):
        await ApiKeyRepository(db).revoke(key_id)

    _run(work)
    click.echo(f"key {key_id} revoked")
