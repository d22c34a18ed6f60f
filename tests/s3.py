"""A real S3 for tests: moto's standalone server on 127.0.0.1, on a free port.

Used by the ``s3_server`` and ``s3_bucket`` fixtures in ``tests/conftest.py``. The server runs
in a thread of the test process and speaks HTTP, so other processes (subprocesses, Ray
workers) reach it too, given the storage options.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

# Fake credentials and no instance metadata, so nothing can reach a real AWS account.
# Config files are pointed at paths that do not exist so a developer's ~/.aws is ignored.
AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent/reelfarm-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/reelfarm-tests/aws-credentials",
}
# Variables that could redirect a client to a real account or endpoint.
AWS_ENV_UNSET: tuple[str, ...] = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL")


@dataclass
class MotoS3:
    """A running moto server and how to reach it."""

    server: Any  # moto.server.ThreadedMotoServer
    endpoint_url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url, "storage_options": self.storage_options}

    def stop(self) -> None:
        self.server.stop()


def storage_options_for(endpoint_url: str) -> dict[str, Any]:
    """s3fs options for the moto server at ``endpoint_url``."""
    return {
        "key": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "secret": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
    }


def start_moto_server() -> MotoS3:
    """Start moto's S3 server on 127.0.0.1 on a free port; the caller stops it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint_url = f"http://{host}:{port}"
    return MotoS3(server, endpoint_url, storage_options_for(endpoint_url))


def _client(storage_options: dict[str, Any]) -> Any:
    import boto3

    return boto3.client(
        "s3",
        aws_access_key_id=storage_options["key"],
        aws_secret_access_key=storage_options["secret"],
        **storage_options["client_kwargs"],
    )


def create_bucket(storage_options: dict[str, Any], name: str | None = None) -> str:
    """Create a bucket (a fresh random name by default) and return its name."""
    name = name or f"reelfarm-test-{uuid.uuid4().hex[:12]}"
    _client(storage_options).create_bucket(Bucket=name)
    return name


def delete_bucket(storage_options: dict[str, Any], name: str) -> None:
    """Remove a bucket and everything in it (for test teardown; moto keeps it in memory)."""
    client = _client(storage_options)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})
    client.delete_bucket(Bucket=name)
