# cooper's container image: a release build on the Rust image, copied onto distroless
# (glibc and CA certificates, no shell, no package manager), run as a non-root user.
#
#   docker build -t cooper:0.1.0 .
#   docker build --build-arg FEATURES=highs -t cooper:0.1.0-highs .   # HiGHS solver backend
#
# The default build uses the pure-Rust microlp backend: on cooper's benchmark mixes it is
# faster than HiGHS (column generation solves many small LPs, where HiGHS's per-solve setup
# dominates; see the README's benchmarks), and it needs no C++ toolchain.
FROM rust:1.95-bookworm AS build
ARG FEATURES=""
RUN if [ -n "$FEATURES" ]; then \
      apt-get update && apt-get install -y --no-install-recommends cmake clang libclang-dev \
      && rm -rf /var/lib/apt/lists/*; \
    fi
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cooper --features "$FEATURES" \
 && strip target/release/cooper

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cooper /usr/local/bin/cooper
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cooper"]
CMD ["controller"]
