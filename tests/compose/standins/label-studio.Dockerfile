# TEST HARNESS ONLY: a stand-in for heartexlabs/label-studio:1.23.2 (PyPI's label-studio==1.23.2 on
# Debian bookworm's Python 3.11), see base_images.sh. Same port, data directory and start-up as the official
# image: the admin from LABEL_STUDIO_USERNAME/PASSWORD/USER_TOKEN on the first start, data in /label-studio/data.
FROM python:3.11-slim
RUN python -m venv /opt/label-studio \
 && /opt/label-studio/bin/pip install --no-cache-dir label-studio==1.23.2 \
 && mkdir -p /label-studio/data
ENV PATH=/opt/label-studio/bin:$PATH LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data
WORKDIR /label-studio
EXPOSE 8080
CMD ["sh", "-c", "exec label-studio start --no-browser --host 0.0.0.0 --port 8080 --username \"$LABEL_STUDIO_USERNAME\" --password \"$LABEL_STUDIO_PASSWORD\" --user-token \"$LABEL_STUDIO_USER_TOKEN\""]
