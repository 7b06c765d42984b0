# A minimal herald image: the statically linked, stripped binary that scripts/release builds into
# dist/, and nothing else (no shell, no libc, no CA store: herald needs none of them).
#   scripts/release && podman build -t herald .      (or docker build)
#   podman run -p 8080:8080 herald
# History on disk: -e HERALD_DATA_DIR=/data -v herald-data:/data (a volume writable by uid 65534).
FROM scratch
COPY dist/herald-*-x86_64-linux /herald
USER 65534:65534
ENV HERALD_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/herald"]
CMD ["serve"]
