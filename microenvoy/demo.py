"""``microenvoy demo``: an agent on an embedded default config, with nothing else needed on the machine.

It generates a throwaway self-signed certificate (localhost, 127.0.0.1, ::1), starts the built-in demo
upstream (an h2c HTTP echo and gRPC echo, ``microenvoy.io.demo_upstream``) and an agent with:

* ``http``: TCP 127.0.0.1:10000, HTTP/1.1 and h2c, advertising HTTP/3 with ``alt-svc``;
* ``https``: TCP 127.0.0.1:10443, TLS with ALPN h2 / http/1.1;
* ``h3``: UDP 127.0.0.1:10443, QUIC + HTTP/3 (resumption, 0-RTT for idempotent requests);
* the admin server on 127.0.0.1:9901.

Every route goes to the demo upstream over HTTP/2 with retries; ``/healthz`` is answered by the agent.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import tempfile
from typing import Any

__all__ = ["demo_config", "run_demo", "self_signed", "self_signed_certificate"]


def self_signed(days: float = 1.0) -> tuple[Any, Any]:
    """A throwaway ECDSA P-256 certificate and key for localhost, 127.0.0.1 and ::1 (cryptography objects)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "microenvoy demo")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def self_signed_certificate(directory: str) -> tuple[str, str]:
    """Write ``cert.pem`` and ``key.pem`` (see ``self_signed``) into ``directory``."""
    from cryptography.hazmat.primitives import serialization

    cert, key = self_signed()
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path


def _mqtt_proxy() -> dict[str, Any]:
    """MQTT 3.1.1/5.0 on 1883: a local broker, and ``demo/#`` bridged to the demo upstream (QoS 1/2
    acknowledged after its 2xx; MQTT 5 requests with a response topic get its answer back)."""
    return {
        "name": "microenvoy.filters.network.mqtt_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/microenvoy.extensions.filters.network.mqtt_proxy.v1.MqttProxy",
            "stat_prefix": "mqtt",
            "routes": [
                {
                    "name": "demo",
                    "match": {"topic_filter": "demo/#"},
                    "route": {"cluster": "demo_upstream", "path": "/demo/{#}", "timeout": "5s"},
                }
            ],
        },
    }


def _coap_proxy() -> dict[str, Any]:
    """CoAP on 5683/udp: ``/demo/...`` routed to the demo upstream (RFC 8075 mapping, blockwise, Observe by
    polling the upstream every 2 s, ``/.well-known/core``)."""
    return {
        "name": "microenvoy.filters.network.coap_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/microenvoy.extensions.filters.network.coap_proxy.v1.CoapProxy",
            "stat_prefix": "coap",
            "routes": [
                {
                    "name": "demo",
                    "match": {"prefix": "/demo/"},
                    "route": {"cluster": "demo_upstream", "timeout": "5s"},
                    "observe": {"mode": "poll", "interval": "2s"},
                    "link": {"rt": "demo", "ct": "50"},
                }
            ],
        },
    }


def _hcm(stat_prefix: str, codec: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "codec_type": codec,
            "route_config": {
                "name": "demo",
                "virtual_hosts": [
                    {
                        "name": "demo",
                        "domains": ["*"],
                        "routes": [
                            {
                                "match": {"path": "/healthz"},
                                "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
                            },
                            {
                                "match": {"prefix": "/", "grpc": {}},
                                "route": {"cluster": "demo_upstream", "timeout": "0s"},
                            },
                            {
                                "match": {"prefix": "/"},
                                "route": {
                                    "cluster": "demo_upstream",
                                    "timeout": "15s",
                                    "retry_policy": {
                                        "retry_on": "5xx,reset,connect-failure",
                                        "num_retries": 2,
                                    },
                                },
                            },
                        ],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                    },
                }
            ],
        },
    }


def demo_config(cert: str, key: str, upstream_port: int, *, http_port: int = 10000,
                https_port: int = 10443, admin_port: int = 9901, mqtt_port: int = 1883, coap_port: int = 5683,
                address: str = "127.0.0.1") -> dict[str, Any]:  # fmt: skip
    tls_certs = [{"certificate_chain": {"filename": cert}, "private_key": {"filename": key}}]
    return {
        "node": {"id": "demo", "cluster": "demo"},
        "admin": {"address": {"socket_address": {"address": address, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {"socket_address": {"address": address, "port_value": http_port}},
                    "advertise_http3": {"listener": "h3"},
                    "filter_chains": [{"filters": [_hcm("http", "AUTO")]}],
                },
                {
                    "name": "https",
                    "address": {"socket_address": {"address": address, "port_value": https_port}},
                    "filter_chains": [
                        {
                            "filters": [_hcm("https", "AUTO")],
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls"
                                    ".v3.DownstreamTlsContext",
                                    "common_tls_context": {"tls_certificates": tls_certs},
                                },
                            },
                        }
                    ],
                },
                {
                    "name": "h3",
                    "address": {
                        "socket_address": {"address": address, "port_value": https_port, "protocol": "UDP"}
                    },
                    "udp_listener_config": {"quic_options": {}},
                    "filter_chains": [
                        {
                            "filters": [_hcm("h3", "HTTP3")],
                            "transport_socket": {
                                "name": "envoy.transport_sockets.quic",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.quic"
                                    ".v3.QuicDownstreamTransport",
                                    "downstream_tls_context": {
                                        "common_tls_context": {"tls_certificates": tls_certs}
                                    },
                                },
                            },
                        }
                    ],
                },
                {
                    "name": "mqtt",
                    "address": {"socket_address": {"address": address, "port_value": mqtt_port}},
                    "filter_chains": [{"filters": [_mqtt_proxy()]}],
                },
                {
                    "name": "coap",
                    "address": {
                        "socket_address": {"address": address, "port_value": coap_port, "protocol": "UDP"}
                    },
                    "filter_chains": [{"filters": [_coap_proxy()]}],
                },
            ],
            "clusters": [
                {
                    "name": "demo_upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "lb_policy": "ROUND_ROBIN",
                    "typed_extension_protocol_options": {
                        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3"
                            ".HttpProtocolOptions",
                            "explicit_http_config": {"http2_protocol_options": {}},
                        }
                    },
                    "load_assignment": {
                        "cluster_name": "demo_upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": upstream_port,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


async def run_demo(args: argparse.Namespace) -> int:
    from microenvoy.config.loader import parse_bootstrap
    from microenvoy.io.demo_upstream import DemoUpstream
    from microenvoy.io.server import Server

    upstream = DemoUpstream()
    await upstream.start()
    with tempfile.TemporaryDirectory(prefix="microenvoy-demo-") as tmp:
        cert, key = self_signed_certificate(tmp)
        doc = demo_config(cert, key, upstream.port, http_port=args.http_port, https_port=args.https_port,
                          admin_port=args.admin_port, mqtt_port=args.mqtt_port,
                          coap_port=getattr(args, "coap_port", 5683))  # fmt: skip
        server = Server(parse_bootstrap(doc), admin_address_path=getattr(args, "admin_address_path", None))
        await server.start()
        ports = {d["name"]: d["local_address"]["socket_address"]["port_value"] for d in server.listeners()}
        admin = server.admin.port if server.admin else 0
        banner = _banner(
            ports["http"], ports["https"], ports["h3"], admin, cert, ports["mqtt"], ports["coap"]
        )
        print(banner, flush=True)
        try:
            await server.serve()
        finally:
            await upstream.close()
    return 0


def _banner(http: int, https: int, h3: int, admin: int, cert: str, mqtt: int, coap: int) -> str:
    return f"""
microenvoy demo is running (Ctrl-C to stop)

  HTTP/1.1 + h2c     http://127.0.0.1:{http}/          (TCP; advertises h3 with alt-svc)
  HTTPS (h2, 1.1)    https://127.0.0.1:{https}/         (TCP, self-signed certificate)
  HTTP/3 (QUIC)      https://127.0.0.1:{h3}/         (UDP, same certificate)
  MQTT 3.1.1 / 5.0   mqtt://127.0.0.1:{mqtt}            (TCP; local broker, demo/# bridged upstream)
  CoAP               coap://127.0.0.1:{coap}            (UDP; /demo/... routed upstream, Observe, blockwise)
  admin              http://127.0.0.1:{admin}/
  upstream           built-in h2c echo + gRPC echo (/microenvoy.demo.v1.Echo/Echo echoes any message)

Try:
  curl -si http://127.0.0.1:{http}/hello
  curl -s --http2-prior-knowledge http://127.0.0.1:{http}/hello -d 'hi from h2c'
  curl -sk --http2 https://127.0.0.1:{https}/hello
  python -m microenvoy.tools.h3get https://127.0.0.1:{h3}/hello          # HTTP/3 (aioquic client)
  python -m microenvoy.tools.h3get --grpc /microenvoy.demo.v1.Echo/Echo https://127.0.0.1:{h3}/
  mosquitto_pub -p {mqtt} -t demo/sensor/1 -m '{{"t": 21.5}}' -q 1    # acked after the upstream's 200
  mosquitto_rr -p {mqtt} -t demo/hello -e demo-replies/1 -m hi         # MQTT 5: prints what the upstream got
  coap-client-notls -m get coap://127.0.0.1:{coap}/demo/hello             # libcoap; 2.05 + the echo
  coap-client-notls -m get -s 6 coap://127.0.0.1:{coap}/demo/clock         # Observe for 6 s
  curl -s http://127.0.0.1:{admin}/stats?filter=downstream_rq
  (certificate: {cert})
"""
