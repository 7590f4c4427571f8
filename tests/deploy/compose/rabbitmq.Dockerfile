# Stands in for rabbitmq:3-management in the compose test: Debian's RabbitMQ (3.10) with the
# management plugin, reading /etc/rabbitmq/conf.d/ like the official image, running as rabbitmq.
FROM local/debian:bookworm
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends rabbitmq-server \
 && rm -rf /var/lib/apt/lists/* \
 && rabbitmq-plugins enable --offline rabbitmq_management \
 && install -d -o rabbitmq -g rabbitmq /etc/rabbitmq/conf.d /var/lib/rabbitmq /var/log/rabbitmq
# Logs to stdout, as in the official image.
ENV RABBITMQ_LOGS=- HOME=/var/lib/rabbitmq
USER rabbitmq
EXPOSE 5672 15672
CMD ["rabbitmq-server"]
