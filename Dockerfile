# cooper's container image: a release build on the Rust image, copied onto distroless
# (glibc and CA certificates, no shell, no package manager), run as a non-root user.
#   docker build -t cooper:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin cooper \
 && strip target/release/cooper

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/cooper /usr/local/bin/cooper
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cooper"]
CMD ["controller"]
