"""Redis with an ACL (the default user disabled, one user with a password), a real server: the right
credentials serve, wrong ones are a clear error that names the user and never the secret, and nothing is
written; secrets come from the config, an environment variable or a file and are never printed. Over TLS
and mutual TLS too (the harness's servers with a test CA)."""
from __future__ import annotations

import pytest
import redis
import torch

from torchrec_hps.config import RedisTierConfig, TableSpec
from torchrec_hps.storage import RedisTier, TierError


def _spec(namespace):
    return TableSpec(namespace, "t1", num_rows=100, dim=4)


def _round_trip(cfg: RedisTierConfig, namespace: str, n: int, value: float) -> None:
    """Write n rows through a tier made from `cfg`, read back n + 1: the n rows, then one absent."""
    tier = RedisTier(cfg)
    spec = _spec(namespace)
    tier.add_table(spec)
    tier.put(spec.key, torch.arange(n), torch.full((n, 4), value))
    rows, found = tier.get(spec.key, torch.arange(n + 1))
    assert found.tolist() == [True] * n + [False] and rows[:n].eq(value).all()
    tier.drop_table(spec.key)
    tier.close()


@pytest.mark.parametrize("how", ["plain", "env", "file"])
def test_the_acl_user_is_served_with_its_password_from_config_env_or_file(secured_redis, namespace, tmp_path,
                                                                          monkeypatch, how):
    url, user, password = secured_redis
    if how == "env":
        monkeypatch.setenv("HPS_TEST_REDIS_PASSWORD", password)
        given = "env:HPS_TEST_REDIS_PASSWORD"
    elif how == "file":
        (tmp_path / "redis.secret").write_text(password + "\n")
        given = f"file:{tmp_path / 'redis.secret'}"
    else:
        given = password
    cfg = RedisTierConfig(url=url, username=user, password=given)
    assert password not in repr(cfg)
    _round_trip(cfg, namespace, 5, 2.0)


@pytest.mark.parametrize("user, password", [("hps", "wrong-password"), ("nobody", "bad-pw-zz"), (None, None)])
def test_wrong_credentials_are_a_clear_error_and_write_nothing(secured_redis, namespace, user, password):
    url, good_user, good_password = secured_redis
    with pytest.raises(TierError, match="authentication failed|NOAUTH|Authentication required") as e:
        RedisTier(RedisTierConfig(url=url, username=user, password=password))
    assert good_password not in str(e.value) and (password is None or password not in str(e.value))
    admin = redis.Redis.from_url(url, username=good_user, password=good_password)
    assert not admin.keys(f"*{namespace}*")  # nothing was written


def test_credentials_in_the_url_are_refused_so_they_are_never_printed():
    with pytest.raises(ValueError, match="redis.url holds credentials"):
        RedisTierConfig(url="redis://hps:s3cret@127.0.0.1:6379")
    with pytest.raises(ValueError, match="environment variable 'HPS_NOT_SET_ANYWHERE' is not set"):
        RedisTier(RedisTierConfig(url="redis://127.0.0.1:1", password="env:HPS_NOT_SET_ANYWHERE"))


def test_tls_with_the_servers_ca_serves(tls_redis, namespace):
    url, ca = tls_redis
    _round_trip(RedisTierConfig(url=url, ssl_ca_certs=ca), namespace, 3, 5.0)


def test_tls_refuses_a_plain_client_and_an_unknown_ca(tls_redis, tmp_path):
    url, ca = tls_redis
    plain = url.replace("rediss://", "redis://")
    with pytest.raises(TierError, match="cannot reach"):
        RedisTier(RedisTierConfig(url=plain))
    with pytest.raises(TierError, match="certificate verify failed"):
        RedisTier(RedisTierConfig(url=url))  # the system's CAs do not sign the test server


def test_mutual_tls_serves_with_the_clients_certificate_and_refuses_without(mtls_redis, namespace):
    url, ca, cert, key = mtls_redis
    with pytest.raises(TierError, match="cannot reach"):  # the server demands a client certificate
        RedisTier(RedisTierConfig(url=url, ssl_ca_certs=ca))
    with pytest.raises(ValueError, match="both ssl_certfile and ssl_keyfile"):
        RedisTierConfig(url=url, ssl_ca_certs=ca, ssl_certfile=cert)
    _round_trip(RedisTierConfig(url=url, ssl_ca_certs=ca, ssl_certfile=cert, ssl_keyfile=key), namespace, 4, 3.0)
