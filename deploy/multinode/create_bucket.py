"""Create the archive's bucket (``[archive] url = "s3://bucket/..."``) unless it exists.

The one-shot ``archive-bucket`` service of compose.yaml runs this with the node's own settings
(the mounted cxrnode.toml and the CXRNODE_* environment), so the bucket is the one the node
uses, reached with the node's key pair. Exit 0 when the bucket exists (created now or before),
1 otherwise, with the store's error. tests/unit/test_deploy_multinode.py runs it against a
SeaweedFS server started with the credentials compose.yaml gives the seaweedfs service.
"""

from __future__ import annotations

import sys

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from node.settings import load_settings

MISSING = {"404", "NoSuchBucket", "NotFound"}


def main() -> int:
    archive = load_settings().archive
    if not archive.is_s3:
        print(f"archive.url {archive.url!r} is not an s3:// URL: nothing to create", file=sys.stderr)
        return 1
    bucket, _ = archive.s3_location()
    client = boto3.client(
        "s3", endpoint_url=archive.s3_endpoint_url or None, region_name=archive.s3_region or None,
        aws_access_key_id=archive.s3_access_key_id or None,
        aws_secret_access_key=archive.s3_secret_access_key or None,
        config=Config(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 5},
                      connect_timeout=archive.s3_timeout_s, read_timeout=archive.s3_timeout_s))
    try:
        try:
            client.head_bucket(Bucket=bucket)
            print(f"bucket {bucket} exists")
            return 0
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code", "")) not in MISSING:
                raise
        location = {} if archive.s3_region in ("", "us-east-1") else {
            "CreateBucketConfiguration": {"LocationConstraint": archive.s3_region}}
        client.create_bucket(Bucket=bucket, **location)
        print(f"bucket {bucket} created")
        return 0
    except (BotoCoreError, ClientError) as exc:
        print(f"bucket {bucket} at {archive.s3_endpoint_url or 'AWS'}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
