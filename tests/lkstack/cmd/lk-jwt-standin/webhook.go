package main

import (
	"net/http"

	"github.com/livekit/protocol/auth"
	"github.com/livekit/protocol/webhook"
)

// sfuWebhook takes LiveKit's webhooks (POST /sfu_webhook), as lk-jwt-service versions after
// 0.5.0 do: livekit/protocol's receiver checks the signature and the body's hash; 200 when
// LiveKit signed this body, 401 otherwise. Counted in /stats as webhooks accepted or refused.
func (s *service) sfuWebhook(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	if _, err := webhook.ReceiveWebhookEvent(r, auth.NewSimpleKeyProvider(s.key, s.secret)); err != nil {
		s.stats.add(&s.stats.Webhooks, "refused")
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	s.stats.add(&s.stats.Webhooks, "accepted")
	w.WriteHeader(http.StatusOK)
}
