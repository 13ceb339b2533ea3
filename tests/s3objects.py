"""Put test inputs on the moto S3 server: a prompt table, a whole model directory."""

from __future__ import annotations

import io
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq


def upload_table(bucket: str, key: str, table: pa.Table) -> str:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())
    return f"s3://{bucket}/{key}"


def upload_dir(directory: Path, bucket: str, prefix: str) -> str:
    """Every file under `directory` to s3://bucket/prefix/<relative path>; returns that URI."""
    s3 = boto3.client("s3")
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(directory).as_posix()}")
    return f"s3://{bucket}/{prefix}"
