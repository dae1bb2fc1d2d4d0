"""Runs the bench model once for one request read from stdin; prints one chunk a line."""

import asyncio
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: ws_server's SDK


async def main(model_dir: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_main", model_dir / "main.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Bench()
    request = sys.stdin.read()
    async for chunk in model.on_chat_messages([{"role": "user", "content": request}]):
        sys.stdout.write(chunk + "\n")


asyncio.run(main(Path(sys.argv[1])))
