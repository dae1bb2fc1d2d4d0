"""Tells what Ray assigned to its actor: config.yaml's isolation.resources, as Ray's."""

import json

import ray

from ws_server import AnythingBaseModel


class ResourcesProbe(AnythingBaseModel):
    async def on_chat_messages(self, messages):
        yield json.dumps(ray.get_runtime_context().get_assigned_resources())
