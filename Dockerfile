# Draft: CUDA build image -> CUDA runtime image. The `cuda` build and its GPU check land with the
# CUDA backend; until then this image builds the CPU binary on the CUDA base so the layout is set.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config python3 python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
ENV PATH=/root/.cargo/bin:$PATH
WORKDIR /src
COPY . .
RUN cargo build --release && models/fetch.sh

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
WORKDIR /app
COPY --from=build /src/target/release/cited /usr/local/bin/cited
COPY --from=build /src/models /app/models
ENTRYPOINT ["cited"]
