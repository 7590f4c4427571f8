# The compose half of `make test-deploy` (tests/deploy/compose_docker.py): the base of the local
# images, standing in for the official ones (no image registry is reachable from the test
# machine). local/debian-root:bookworm is the debootstrapped root of tests/deploy/_common.py,
# imported by the driver.
FROM local/debian-root:bookworm
# Packages never start their services while an image is built (Debian's usual image setting).
RUN printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d
# The CAs the test machine trusts (its egress may go through a TLS proxy): pip in the Fleet
# image's build stage reaches PyPI through it. The driver puts the host's bundle in the context.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    LANG=C.UTF-8
