package main

import (
	"encoding/json"
	"net/http"
	"sync"
)

// counters counts per route: "legacy" (/sfu/get, /get_token), "client" and "federation"
// (the get_token routes Synapse forwards), "delegate_delayed_leave", "ping".
type counters map[string]int

// stats is what the service did, served on GET /stats so that tests can check its side
// effects: requests that reached a route, tokens issued, CreateRoom calls made to LiveKit
// and those of them that failed, LiveKit webhooks accepted and refused.
type stats struct {
	mu               sync.Mutex
	Requests         counters `json:"requests"`
	Issued           counters `json:"issued"`
	CreateRoom       counters `json:"create_room"`
	CreateRoomFailed counters `json:"create_room_failed"`
	Webhooks         counters `json:"webhooks"`
}

func newStats() *stats {
	return &stats{
		Requests:         counters{},
		Issued:           counters{"client": 0, "federation": 0, "legacy": 0},
		CreateRoom:       counters{"client": 0, "federation": 0},
		CreateRoomFailed: counters{"client": 0, "federation": 0},
		Webhooks:         counters{"accepted": 0, "refused": 0},
	}
}

func (s *stats) add(c *counters, route string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	(*c)[route]++
}

func (s *stats) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	s.mu.Lock()
	body, err := json.Marshal(s)
	s.mu.Unlock()
	if err != nil {
		w.WriteHeader(http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(append(body, '\n'))
}
