#!/usr/bin/env bash
# Deploy Legion to Cloud Run: build the image with Cloud Build, keep the API keys in Secret
# Manager, apply deploy/cloudrun/service.yaml with the placeholders filled, check /healthz.
#
#   PROJECT_ID=my-project deploy/cloudrun/deploy.sh
#
# Environment (defaults in brackets):
#   PROJECT_ID        the Google Cloud project (required)
#   REGION            [us-central1]
#   SERVICE           [legion]            the Cloud Run service
#   SECRET            [legion-api-keys]   the Secret Manager secret holding LEGION_API_KEYS
#   API_KEYS_FILE     a file with the key entries, one a line, for a new secret version;
#                     without it, a missing secret is created with one fresh key (printed once)
#   MIN_INSTANCES     [1]    MAX_INSTANCES [4]    CONCURRENCY [32]
#   TAG               [the git commit]    the image tag
#   DRY_RUN=1         print the gcloud commands and the rendered service file, run nothing
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PROJECT_ID="${PROJECT_ID:?set PROJECT_ID to your Google Cloud project}"
REGION="${REGION:-us-central1}"
SERVICE="${SERVICE:-legion}"
SECRET="${SECRET:-legion-api-keys}"
MIN_INSTANCES="${MIN_INSTANCES:-1}"
MAX_INSTANCES="${MAX_INSTANCES:-4}"
CONCURRENCY="${CONCURRENCY:-32}"
TAG="${TAG:-$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo latest)}"
DRY_RUN="${DRY_RUN:-0}"
IMAGE="$REGION-docker.pkg.dev/$PROJECT_ID/legion/legion:$TAG"
SERVICE_ACCOUNT="legion-run@$PROJECT_ID.iam.gserviceaccount.com"

for n in "$MIN_INSTANCES" "$MAX_INSTANCES" "$CONCURRENCY"; do
    [[ "$n" =~ ^[0-9]+$ ]] || { echo "MIN_INSTANCES, MAX_INSTANCES and CONCURRENCY must be whole numbers" >&2; exit 2; }
done
if (( MAX_INSTANCES < 1 || MIN_INSTANCES > MAX_INSTANCES || CONCURRENCY < 1 || CONCURRENCY > 1000 )); then
    echo "need 1 <= MAX_INSTANCES, MIN_INSTANCES <= MAX_INSTANCES and 1 <= CONCURRENCY <= 1000" >&2
    exit 2
fi

run() {
    if [ "$DRY_RUN" = "1" ]; then echo "+ $*"; else "$@"; fi
}

exists() {  # true when a gcloud describe succeeds (always false in a dry run)
    [ "$DRY_RUN" != "1" ] && "$@" >/dev/null 2>&1
}

rendered="$(mktemp --suffix=.yaml)"
trap 'rm -f "$rendered"' EXIT
sed -e "s|__IMAGE__|$IMAGE|g" -e "s|__REGION__|$REGION|g" -e "s|__SECRET__|$SECRET|g" \
    -e "s|__SERVICE_ACCOUNT__|$SERVICE_ACCOUNT|g" -e "s|__MIN_INSTANCES__|$MIN_INSTANCES|g" \
    -e "s|__MAX_INSTANCES__|$MAX_INSTANCES|g" -e "s|__CONCURRENCY__|$CONCURRENCY|g" \
    -e "s|^  name: legion$|  name: $SERVICE|" \
    "$here/service.yaml" > "$rendered"
if grep -q "__[A-Z_]*__" "$rendered"; then
    echo "unfilled placeholder in service.yaml: $(grep -o '__[A-Z_]*__' "$rendered" | head -1)" >&2
    exit 1
fi

gc=(gcloud --project "$PROJECT_ID" --quiet)
run "${gc[@]}" services enable run.googleapis.com artifactregistry.googleapis.com \
    cloudbuild.googleapis.com secretmanager.googleapis.com
exists "${gc[@]}" artifacts repositories describe legion --location "$REGION" ||
    run "${gc[@]}" artifacts repositories create legion --repository-format docker --location "$REGION"
exists "${gc[@]}" iam service-accounts describe "$SERVICE_ACCOUNT" ||
    run "${gc[@]}" iam service-accounts create legion-run --display-name "Legion on Cloud Run"

# The keys never touch the image or the service file: Cloud Run reads the secret at start.
if [ -n "${API_KEYS_FILE:-}" ]; then
    keys="$(grep -v '^\s*#' "$API_KEYS_FILE" | grep -v '^\s*$' | paste -sd, -)"
    exists "${gc[@]}" secrets describe "$SECRET" ||
        run "${gc[@]}" secrets create "$SECRET" --replication-policy automatic
    if [ "$DRY_RUN" = "1" ]; then
        echo "+ ${gc[*]} secrets versions add $SECRET --data-file - (the keys of $API_KEYS_FILE)"
    else
        printf '%s' "$keys" | "${gc[@]}" secrets versions add "$SECRET" --data-file -
    fi
elif ! exists "${gc[@]}" secrets describe "$SECRET"; then
    key="$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
    run "${gc[@]}" secrets create "$SECRET" --replication-policy automatic
    if [ "$DRY_RUN" = "1" ]; then
        echo "+ ${gc[*]} secrets versions add $SECRET --data-file - (one new key)"
    else
        printf '%s' "$key" | "${gc[@]}" secrets versions add "$SECRET" --data-file -
        echo "New API key (shown once; clients send it as 'Authorization: Bearer <key>'): $key"
    fi
fi
run "${gc[@]}" secrets add-iam-policy-binding "$SECRET" \
    --member "serviceAccount:$SERVICE_ACCOUNT" --role roles/secretmanager.secretAccessor

run "${gc[@]}" builds submit "$root" --config "$here/cloudbuild.yaml" --substitutions "_IMAGE=$IMAGE"
if [ "$DRY_RUN" = "1" ]; then
    echo "+ ${gc[*]} run services replace <rendered service.yaml> --region $REGION"
    cat "$rendered"
else
    "${gc[@]}" run services replace "$rendered" --region "$REGION"
fi
# Legion checks API keys itself; Cloud Run's own IAM check would demand Google identities.
run "${gc[@]}" run services add-iam-policy-binding "$SERVICE" --region "$REGION" \
    --member allUsers --role roles/run.invoker

if [ "$DRY_RUN" != "1" ]; then
    url="$("${gc[@]}" run services describe "$SERVICE" --region "$REGION" --format 'value(status.url)')"
    echo "Legion is at $url (HTTPS, certificate managed by Google)"
    curl -fsS "$url/healthz"
    echo
fi
