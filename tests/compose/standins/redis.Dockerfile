# TEST HARNESS ONLY: a stand-in for redis:7.4 (Debian bookworm's redis-server 7.0), see base_images.sh.
FROM roi-standin/bookworm:minbase
RUN apt-get update \
 && apt-get install -y --no-install-recommends redis-server \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
WORKDIR /data
# The official image runs redis-server with protected mode off and a /data working directory.
ENTRYPOINT ["/bin/sh", "-c", "if [ \"$1\" = redis-server ]; then shift; exec runuser -u redis -- redis-server --protected-mode no \"$@\"; fi; exec \"$@\"", "--"]
CMD ["redis-server"]
