# drover: a static binary on distroless, as a non-root user.
# Without a Docker daemon, `make image` builds the same image (one layer, the
# static binary, user 65532, entrypoint /drover serve) into bin/drover-image.tar.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-X github.com/drover-io/drover/cmd/drover/app.Version=${VERSION}" -o /out/drover ./cmd/drover

FROM gcr.io/distroless/static:nonroot
COPY --from=build /out/drover /drover
USER 65532:65532
EXPOSE 9090 4222
ENTRYPOINT ["/drover"]
CMD ["serve"]
