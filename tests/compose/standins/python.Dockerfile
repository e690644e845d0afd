# TEST HARNESS ONLY: a stand-in for python:3.11-slim (Debian bookworm's Python 3.11), see base_images.sh.
FROM roi-standin/bookworm:minbase
COPY host-ca-certificates.crt /usr/local/share/ca-certificates/host.crt
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3 python3-pip python3-venv python-is-python3 \
 && cat /usr/local/share/ca-certificates/host.crt >> /etc/ssl/certs/ca-certificates.crt \
 && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED \
 && rm -rf /var/lib/apt/lists/*
# As in the official image: pip installs system-wide, the certificate bundle is the system's.
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt LANG=C.UTF-8
CMD ["python3"]
