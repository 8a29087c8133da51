"""A real S3-compatible server for the artifact tests: S3Proxy (Apache-2.0, from Maven
Central; ./trackd-dev fetches it) over its filesystem blob store, with SigV4 authentication
on, listening on 127.0.0.1. Started and stopped like the other services: polled with a
deadline, SIGTERM, then SIGKILL."""
import os
import socket
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

from harness import ROOT, wait_for

JAR = Path(os.environ.get("TRACKD_S3PROXY_JAR",
                          ROOT / ".cache" / "s3proxy" / "s3proxy-2.6.0-jar-with-dependencies.jar"))
ACCESS_KEY = "trackd-test-access"
SECRET_KEY = "trackd-test-secret-0123456789"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, workdir):
        self.workdir = Path(workdir)
        (self.workdir / "blobs").mkdir(parents=True, exist_ok=True)
        self.logpath = self.workdir / "s3proxy.log"
        self.port = None
        self.proc = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def start(self, port=None):
        assert JAR.exists(), f"{JAR} is missing: ./trackd-dev test fetches it (or set TRACKD_S3PROXY_JAR)"
        self.port = port or self.port or _free_port()
        conf = self.workdir / "s3proxy.conf"
        conf.write_text(
            "s3proxy.authorization=aws-v2-or-v4\n"
            f"s3proxy.endpoint={self.url}\n"
            f"s3proxy.identity={ACCESS_KEY}\n"
            f"s3proxy.credential={SECRET_KEY}\n"
            "jclouds.provider=filesystem\n"
            f"jclouds.filesystem.basedir={self.workdir / 'blobs'}\n")
        with open(self.logpath, "ab") as log:
            self.proc = subprocess.Popen(["java", "-jar", str(JAR), "--properties", str(conf)],
                                         stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or self._answers(), 90,
                 f"S3Proxy on port {self.port}", interval=0.2)
        assert self.proc.poll() is None, self.logpath.read_text()[-3000:]
        return self

    def _answers(self):
        try:
            urllib.request.urlopen(self.url + "/", timeout=2)
            return True
        except urllib.error.HTTPError:
            return True  # 403 without credentials: it is up
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def env(self):
        """What boto3 (and so MLflow's S3 repository) and the agent need to reach it."""
        # boto3 >= 1.36 adds CRC checksums (aws-chunked bodies) that S3-compatible servers
        # predating them refuse; "when_required" is boto3's documented switch for them.
        return {"MLFLOW_S3_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
                "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}

    def make_bucket(self, name):
        import boto3
        from botocore.config import Config

        s3 = boto3.client("s3", endpoint_url=self.url, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                          config=Config(request_checksum_calculation="when_required",
                                        response_checksum_validation="when_required"))
        s3.create_bucket(Bucket=name)
        return s3
